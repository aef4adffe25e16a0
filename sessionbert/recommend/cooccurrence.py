"""Co-occurrence baseline: services that co-occur with the user's used services across users (before the
test window), the user's own services removed."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def cooccurrence_recs(used: Mapping[str, set[str]], users: Iterable[str], k: int = 5) -> dict[str, list[str]]:
    """score(u, s) = sum over t in used(u) of #users who used both s and t; ties by popularity, then name.

    The user's own row adds nothing to services they have not used, so it needs no exclusion.
    """
    names = sorted({s for v in used.values() for s in v})
    col = {s: i for i, s in enumerate(names)}
    all_users = list(used)
    m = np.zeros((len(all_users), len(names)), dtype=np.float32)
    for r, u in enumerate(all_users):
        m[r, [col[s] for s in used[u]]] = 1.0
    co = m.T @ m  # (S, S) users who used both
    pop = np.diag(co).copy()
    np.fill_diagonal(co, 0.0)
    order_name = np.arange(len(names))
    out = {}
    for u in users:
        mine = [col[s] for s in used.get(u, ()) if s in col]
        score = co[mine].sum(0) if mine else np.zeros(len(names), dtype=np.float32)
        rank = np.lexsort((order_name, -pop, -score))  # last key first: score, then popularity, then name
        out[u] = [names[i] for i in rank if i not in set(mine)][:k]
    return out
