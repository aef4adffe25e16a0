"""Baselines for new-service recommendation: popularity and persona (group) popularity."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


def _top_new(ranked: list[str], used: set[str], k: int) -> list[str]:
    out = []
    for s in ranked:
        if s not in used:
            out.append(s)
            if len(out) == k:
                break
    return out


def _ranked(counter: Counter) -> list[str]:
    # ties broken by name so the baseline is deterministic
    return [s for s, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def popularity_recs(used: Mapping[str, set[str]], users: Iterable[str], k: int = 5) -> dict[str, list[str]]:
    """Top-k services by number of distinct users who used them before the test window, minus the user's own."""
    ranked = _ranked(Counter(s for services in used.values() for s in services))
    return {u: _top_new(ranked, used.get(u, set()), k) for u in users}


def group_popularity_recs(
    used: Mapping[str, set[str]], group: Mapping[str, str], users: Iterable[str], k: int = 5
) -> dict[str, list[str]]:
    """Popularity within the user's group (true persona -> the persona oracle; cluster -> persona-popularity).

    The user's own usage is excluded from nothing: it only adds to counts of services they already used,
    which are dropped from their own list anyway.
    """
    counts: dict[str, Counter] = {}
    for u, services in used.items():
        counts.setdefault(group.get(u), Counter()).update(services)
    ranked = {g: _ranked(c) for g, c in counts.items()}
    glob = _ranked(Counter(s for services in used.values() for s in services))
    out = {}
    for u in users:
        r = ranked.get(group.get(u), []) + glob  # fall back to global popularity to fill k
        out[u] = _top_new(list(dict.fromkeys(r)), used.get(u, set()), k)
    return out
