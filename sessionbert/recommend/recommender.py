"""The paper's new-service recommender: next-service top-k per session over a user's last sessions,
services already used removed, ranked by how often each was recommended."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

RANKERS = ("count", "prob", "persona")  # persona: sessionbert.recommend.persona (no model scores)
MODEL_RANKERS = ("count", "prob")


def recommendable(names: Sequence[str]) -> np.ndarray:
    """(C,) bool: classes that may be recommended (not the "[OTHER]" / special classes)."""
    return np.array([not str(s).startswith("[") for s in names], dtype=bool)


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
    Dict form of `rank_new_services` (which `sessionbert.score` runs with the top-k taken on the device).
    """
    _check(ranker, filter_used)
    names = np.asarray(services, dtype=object)
    user_codes, users = pd.factorize(np.asarray(session_users, dtype=object))
    used_m = used_matrix(users, names, used)
    probs = np.asarray(service_probs)
    q = np.where(recommendable(names)[None, :], probs, -np.inf)
    if filter_used == "before_topk":
        q = np.where(used_m[user_codes], -np.inf, q)
    top = np.argsort(-q, axis=1, kind="stable")[:, :per_session_k]
    svc, cnt, mass = rank_new_services(user_codes, top, np.take_along_axis(q, top, 1),
                                       np.take_along_axis(probs, top, 1), used_m, names, len(users), k, ranker,
                                       filter_used)
    return {u: [(names[c], int(n), float(m)) for c, n, m in zip(svc[i], cnt[i], mass[i]) if c >= 0]
            for i, u in enumerate(users)}


def used_matrix(users: Sequence[str], services: Sequence[str], used: Mapping[str, set[str]]) -> np.ndarray:
    """(U, C) bool: user u used service class c before the cut-off (services outside the classes ignored)."""
    col = {s: i for i, s in enumerate(services)}
    m = np.zeros((len(users), len(services)), bool)
    for i, u in enumerate(users):
        for s in used.get(u, ()):
            if s in col:
                m[i, col[s]] = True
    return m


def _check(ranker: str, filter_used: str) -> None:
    if ranker not in MODEL_RANKERS:
        raise ValueError(f"recommend.ranker must be one of {MODEL_RANKERS} here, got {ranker!r}")
    if filter_used not in ("after_topk", "before_topk"):
        raise ValueError(f"recommend.filter_used must be after_topk or before_topk, got {filter_used!r}")


def rank_new_services(
    row_user: np.ndarray,  # (R,) user index of each session row, rows of a user in session order
    top: np.ndarray,  # (R, p) the session's top-p classes (by q, ties by class index)
    top_q: np.ndarray,  # (R, p) their scores q: -inf where the class may not be recommended
    top_prob: np.ndarray,  # (R, p) their probabilities
    used: np.ndarray,  # (U, C) bool: used before the cut-off
    services: Sequence[str],
    n_users: int,
    k: int,
    ranker: str,
    filter_used: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(services (U, k) class index or -1, counts (U, k), summed probabilities (U, k)), vectorised: a (user,
    service) pair counts once per session whose top-p holds it (finite score, not used before); summed
    probabilities accumulate in float64 in session order (np.add.at is sequential), as a Python loop would."""
    _check(ranker, filter_used)
    C = len(services)
    R, p = top.shape if top.ndim == 2 else (0, 0)
    u = np.repeat(np.asarray(row_user, np.int64), p)
    c = np.asarray(top, np.int64).reshape(-1)
    keep = np.isfinite(np.asarray(top_q).reshape(-1))
    if len(c):
        keep &= ~used[u, c]
    key = u[keep] * C + c[keep]
    uniq, inv = np.unique(key, return_inverse=True)
    count = np.bincount(inv, minlength=len(uniq))
    mass = np.zeros(len(uniq), np.float64)
    np.add.at(mass, inv, np.asarray(top_prob, np.float64).reshape(-1)[keep])
    cu, cc = uniq // C, uniq % C
    name_rank = np.argsort(np.argsort(np.asarray(services, dtype=object), kind="stable"), kind="stable")
    if ranker == "count":
        order = np.lexsort((name_rank[cc], -mass, -count, cu))
    else:
        order = np.lexsort((name_rank[cc], -mass, cu))
    cu, cc, count, mass = cu[order], cc[order], count[order], mass[order]
    rank = np.arange(len(cu)) - np.searchsorted(cu, cu)  # cu is sorted
    m = rank < k
    out_s = np.full((n_users, k), -1, np.int64)
    out_c = np.zeros((n_users, k), np.int64)
    out_m = np.zeros((n_users, k), np.float64)
    out_s[cu[m], rank[m]] = cc[m]
    out_c[cu[m], rank[m]] = count[m]
    out_m[cu[m], rank[m]] = mass[m]
    return out_s, out_c, out_m
