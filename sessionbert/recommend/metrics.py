"""Ranking metrics for new-service recommendation (per-user set targets)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def hit_at_k(recs: Mapping[str, Sequence[str]], targets: Mapping[str, set[str]], k: int = 5) -> float:
    """Share of users in `targets` whose top-k recommendations hold at least one target service.

    Users absent from `recs` count as misses, so a recommender cannot improve its score by skipping users.
    """
    if not targets:
        return float("nan")
    hits = sum(1 for u, t in targets.items() if t.intersection(list(recs.get(u, ()))[:k]))
    return hits / len(targets)
