"""data_stats: is a session data set realistic and hard enough to prove anything?

Measured on the events (and, for the supervised checks, the users' true personas):
  * shape: sizes, session-length distribution (median, p99: web sessions are heavy-tailed), Zipf slope of
    page popularity, share of console noise (home/search/help pages);
  * persona signal: a logistic regression on bag-of-services predicts a user's primary persona from one
    session (should be poor) and from the whole history (should be good), 5-fold by user;
  * new-service adoption on the time split (test window = last `test_days`): Hit@5 of popularity and of
    the persona oracle (popularity among users of the true primary persona), through the very functions
    the pipeline reports with (`popularity_recs`, `group_popularity_recs`, `hit_at_k`).

`python -m sessionbert.data.simulator --size default` prints these for the simulator; the target ranges
at the default size are checked by tests/test_simulator.py (slow).

For reference, the same functions on the real web sessions in shared/data: FIFA World Cup 98 (page ids):
page Zipf slope -2.15 (R^2 0.89), session length median 16, p99 151; MSNBC (17 categories): median 2,
p99 31.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sessionbert.data.split import time_split, used_and_adopted
from sessionbert.recommend.baselines import group_popularity_recs, popularity_recs
from sessionbert.recommend.metrics import hit_at_k

#: A page whose id starts with one of these path segments is console noise (home/dashboard, search, help).
NOISE_PAGE_PREFIXES = ("home", "search", "help")
#: Cap on sessions used to train the single-session classifier (keeps the check fast at any size).
MAX_TRAIN_SESSIONS = 60_000
#: Where a session names a service without using it: a search ("Search: <service>" action) or a help
#: article title (the simulator catalogue's help templates).
_MENTION_ACTION = r"^Search: (.+)$"
_MENTION_TITLE = r"^(?:Getting started with (.+)|(.+) pricing|Troubleshooting (.+)) \| Help Center$"


def mention_recs(
    events: pd.DataFrame, split, used: dict[str, set[str]], users: list[str], last_n: int = 8, k: int = 5
) -> dict[str, list[str]]:
    """A session-content-only recommender: services a user searched for or read help about in their last
    `last_n` sessions before the test window (most mentioned first), then popularity. It needs no persona
    and no model; it shows how much of the adoption signal sits in the sessions themselves.
    """
    t = pd.to_datetime(events["timestamp"], utc=True)
    pre = events.loc[t < split.test_start, ["user_id", "session_id", "timestamp", "page_title", "action"]]
    pre = pre[pre["user_id"].isin(set(users))]
    starts = pre.groupby("session_id", sort=False).agg(user_id=("user_id", "first"), start=("timestamp", "min"))
    starts["r"] = starts.groupby("user_id")["start"].rank(method="first", ascending=False)
    recent = set(starts.index[starts["r"] <= last_n])
    pre = pre[pre["session_id"].isin(recent)]
    # extract on the few hundred distinct titles/actions, then map (fast at any size)
    def mention_of(col: pd.Series, pattern: str) -> pd.Series:
        uniq = pd.Series(pd.unique(col.dropna()), dtype="object")
        found = uniq.str.extract(pattern).bfill(axis=1).iloc[:, 0]
        return col.map(dict(zip(uniq, found)))

    m = pd.DataFrame(
        {
            "user_id": np.concatenate([pre["user_id"].to_numpy(), pre["user_id"].to_numpy()]),
            "service": np.concatenate(
                [mention_of(pre["action"], _MENTION_ACTION).to_numpy(object),
                 mention_of(pre["page_title"], _MENTION_TITLE).to_numpy(object)]
            ),
        }
    ).dropna()
    counts = m.groupby(["user_id", "service"]).size().reset_index(name="n")
    counts = counts.sort_values(["user_id", "n", "service"], ascending=[True, False, True])
    ranked = counts.groupby("user_id")["service"].agg(list).to_dict()
    pop = popularity_recs(used, users, k=k + 20)  # enough to fill after removing mentions
    out = {}
    for u in users:
        seen = used.get(u, set())
        r = [s for s in ranked.get(u, []) if s not in seen] + pop[u]
        out[u] = list(dict.fromkeys(r))[:k]
    return out


def _bag(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """Bag-of-services shares: [n_rows, n_cols], each row the share of a row's events per service."""
    m = sp.coo_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_rows, n_cols)).toarray()
    return m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)


def _fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, seed: int) -> np.ndarray:
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=1.0, max_iter=300, random_state=seed)
    # one BLAS thread: these matrices are small, and multi-threaded OpenBLAS spins badly (50x slower)
    # when the machine's cores are busy with other work, e.g. a training run or parallel tests
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(scaler.transform(x_tr), y_tr)
    return clf.predict(scaler.transform(x_te))


def persona_accuracy(
    user_codes: np.ndarray, session_codes: np.ndarray, service_codes: np.ndarray, y_user: np.ndarray, seed: int = 0,
    folds: int = 5,
) -> tuple[float, float]:
    """(single-session, full-history) accuracy of predicting y_user[user] from bag-of-services.

    Arrays are per event: user_codes, session_codes, service_codes (0-based dense codes); y_user is the
    label of each user code. Users are split into `folds` folds; both classifiers train on the other folds'
    users and are scored on the held-out users (single-session: every held-out session counts once).
    """
    n_users, n_sess, n_svc = len(y_user), int(session_codes.max()) + 1, int(service_codes.max()) + 1
    rng = np.random.default_rng(seed)
    fold_of_user = rng.permutation(n_users) % folds  # [n_users]
    # single session
    sess_user = np.zeros(n_sess, np.int64)
    sess_user[session_codes] = user_codes
    x_sess = _bag(session_codes, service_codes, n_sess, n_svc)  # [n_sess, n_svc]
    y_sess = y_user[sess_user]
    # whole history
    x_user = _bag(user_codes, service_codes, n_users, n_svc)  # [n_users, n_svc]
    hits_s = hits_u = 0
    for f in range(folds):
        te_u = fold_of_user == f
        tr_s = np.nonzero(~te_u[sess_user])[0]
        if len(tr_s) > MAX_TRAIN_SESSIONS:
            tr_s = rng.choice(tr_s, MAX_TRAIN_SESSIONS, replace=False)
        te_s = np.nonzero(te_u[sess_user])[0]
        if len(np.unique(y_sess[tr_s])) < 2 or len(te_s) == 0:
            continue
        hits_s += int((_fit_predict(x_sess[tr_s], y_sess[tr_s], x_sess[te_s], seed) == y_sess[te_s]).sum())
        hits_u += int((_fit_predict(x_user[~te_u], y_user[~te_u], x_user[te_u], seed) == y_user[te_u]).sum())
    return hits_s / n_sess, hits_u / n_users


def zipf_slope(counts: np.ndarray) -> tuple[float, float]:
    """Least-squares slope (and R^2) of log(count) on log(rank) over items with count > 0."""
    c = np.sort(counts[counts > 0])[::-1].astype(float)
    if len(c) < 3:
        return float("nan"), float("nan")
    x, y = np.log(np.arange(1, len(c) + 1)), np.log(c)
    slope, icpt = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (slope * x + icpt)) ** 2) / np.sum((y - y.mean()) ** 2)
    return float(slope), float(r2)


def data_stats(
    events: pd.DataFrame,
    users_truth: pd.DataFrame,
    val_days: float = 14,
    test_days: float = 28,
    seed: int = 0,
    max_users: int = 20000,
) -> dict:
    """Realism and difficulty statistics of an event table (EVENT_SCHEMA columns as a DataFrame).

    users_truth needs user_id and primary_persona. When there are more than `max_users` users, a random
    sample of `max_users` users (by `seed`) is measured. Keys: n_users, n_sessions, n_events,
    n_services, n_pages, session_length_{mean,median,p90,p99,max}, page_zipf_slope (+ _r2),
    noise_event_share, persona_accuracy_single_session, persona_accuracy_full_history,
    hit@5_popularity, hit@5_persona_oracle, hit@5_search_hint (services searched for / read about in the
    last 8 sessions, then popularity: the adoption signal inside sessions), users_scored,
    users_with_history, adopter_share,
    new_services_per_scored_user, split {start, val_start, test_start, end}.
    """
    users_all = pd.unique(events["user_id"])
    if len(users_all) > max_users:
        keep = np.random.default_rng(seed).choice(users_all, max_users, replace=False)
        events = events[events["user_id"].isin(keep)]
    events = events.reset_index(drop=True)

    u_codes, u_names = pd.factorize(events["user_id"], sort=False)
    s_codes, _ = pd.factorize(events["session_id"], sort=False)
    v_codes, _ = pd.factorize(events["service"], sort=False)
    p_codes, p_names = pd.factorize(events["page"], sort=False)
    lengths = np.bincount(s_codes)  # [n_sessions] events per session
    page_counts = np.bincount(p_codes)
    first_seg = pd.Series(np.asarray(p_names, dtype=object)).str.split("/").str[0]
    noise_page = first_seg.isin(NOISE_PAGE_PREFIXES).to_numpy()
    slope, r2 = zipf_slope(page_counts)

    out: dict = {
        "n_users": int(len(u_names)),
        "n_sessions": int(len(lengths)),
        "n_events": int(len(events)),
        "n_services": int(v_codes.max() + 1),
        "n_pages": int(len(p_names)),
        "session_length_mean": float(lengths.mean()),
        "session_length_median": float(np.median(lengths)),
        "session_length_p90": float(np.percentile(lengths, 90)),
        "session_length_p99": float(np.percentile(lengths, 99)),
        "session_length_max": int(lengths.max()),
        "sessions_per_user_median": float(np.median(np.bincount(np.unique(np.stack([u_codes, s_codes]), axis=1)[0]))),
        "page_zipf_slope": slope,
        "page_zipf_r2": r2,
        "noise_event_share": float(page_counts[noise_page].sum() / len(events)),
    }

    # persona signal (users without a known persona are left out)
    truth = users_truth.set_index("user_id")["primary_persona"]
    persona = pd.Series(np.asarray(u_names, dtype=object)).map(truth)
    if persona.notna().all() and persona.nunique() >= 2:
        y_user, persona_names = pd.factorize(persona)
        acc_s, acc_u = persona_accuracy(u_codes, s_codes, v_codes, y_user, seed=seed)
        out["persona_accuracy_single_session"] = acc_s
        out["persona_accuracy_full_history"] = acc_u
        out["persona_majority_share"] = float(np.bincount(y_user).max() / len(y_user))
    else:
        out["persona_accuracy_single_session"] = out["persona_accuracy_full_history"] = float("nan")

    # new-service adoption on the time split, through the pipeline's own baseline and metric code
    split = time_split(events["timestamp"], val_days=val_days, test_days=test_days)
    used, adopted = used_and_adopted(events[["user_id", "service", "timestamp"]], split)
    scored = sorted(adopted)
    group = {u: truth.get(u) for u in used}
    out["hit@5_popularity"] = hit_at_k(popularity_recs(used, scored, k=5), adopted, k=5)
    out["hit@5_persona_oracle"] = hit_at_k(group_popularity_recs(used, group, scored, k=5), adopted, k=5)
    if {"page_title", "action"} <= set(events.columns):
        out["hit@5_search_hint"] = hit_at_k(mention_recs(events, split, used, scored, k=5), adopted, k=5)
    out["users_scored"] = len(scored)
    out["users_with_history"] = len(used)
    out["adopter_share"] = len(scored) / max(len(used), 1)
    out["new_services_per_scored_user"] = float(np.mean([len(v) for v in adopted.values()])) if adopted else 0.0
    out["split"] = split.to_dict()
    return out


def _clean(o):
    """JSON-safe: numpy scalars to Python, NaN to None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_data_stats(stats: dict, path: str | Path) -> Path:
    """Write stats as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(stats), indent=2, default=str) + "\n")
    return path
