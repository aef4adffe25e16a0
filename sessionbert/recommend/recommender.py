"""The paper's new-service recommender: next-service top-k per session over a user's last sessions,
services already used removed, ranked by how often each was recommended."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

RANKERS = ("count", "prob", "persona")  # persona: sessionbert.recommend.persona (no model scores)
MODEL_RANKERS = ("count", "prob")


def recommend(
    session_users: Sequence[str],  # (S,) the user of each session
    service_probs: np.ndarray,  # (S, C) next-service probabilities of each session
    services: Sequence[str],  # (C,) class names
    used: Mapping[str, set[str]],
    per_session_k: int = 5,
    k: int = 5,
    ranker: str = "count",
    filter_used: str = "after_topk",
) -> dict[str, list[tuple[str, int, float]]]:
    """user -> [(service, times recommended, summed probability)] best first, at most k.

    `filter_used="after_topk"` is the paper as written: take each session's top-`per_session_k` services,
    then drop those the user already used (a session may then contribute nothing). `"before_topk"` drops
    used services first, so every session contributes `per_session_k` new ones.
    ranker "count" (the paper): by times recommended, ties by summed probability; "prob": by summed probability.
    """
    if ranker not in MODEL_RANKERS:
        raise ValueError(f"recommend.ranker must be one of {MODEL_RANKERS} here, got {ranker!r}")
    if filter_used not in ("after_topk", "before_topk"):
        raise ValueError(f"recommend.filter_used must be after_topk or before_topk, got {filter_used!r}")
    names = np.asarray(services, dtype=object)
    valid = np.array([not s.startswith("[") for s in names])  # never recommend the [OTHER] class
    probs = np.where(valid[None, :], service_probs, -np.inf)
    count: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    mass: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_user: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(session_users):
        by_user[u].append(i)
    for u, rows in by_user.items():
        seen = used.get(u, set())
        p = probs[rows]  # (s, C)
        if filter_used == "before_topk":
            p = np.where(np.isin(names, list(seen))[None, :], -np.inf, p)
        top = np.argsort(-p, axis=1, kind="stable")[:, :per_session_k]
        for r, cols in enumerate(top):
            for c in cols:
                s = names[c]
                if s in seen or not np.isfinite(p[r, c]):
                    continue
                count[u][s] += 1
                mass[u][s] += float(service_probs[rows[r], c])
    out = {}
    for u in by_user:
        cand = list(count[u])
        if ranker == "count":
            cand.sort(key=lambda s: (-count[u][s], -mass[u][s], s))
        else:
            cand.sort(key=lambda s: (-mass[u][s], s))
        out[u] = [(s, count[u][s], mass[u][s]) for s in cand[:k]]
    return out
