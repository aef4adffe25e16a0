"""The process-mining event logs of Tax et al. (CAiSE 2017): CSV ``CaseID,ActivityID,CompleteTimestamp``.

A case is a session; activities are the pages; timestamps are real (local times in the file, read as UTC:
only their order and differences matter). Cases are not linked to users (user_id = the case), no services.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import Adapted, shared_data_dir

COLUMNS = ["CaseID", "ActivityID", "CompleteTimestamp"]


def read_log(path: Path) -> pd.DataFrame:
    """The CSV as (case, activity, timestamp) in file order; a bad row raises naming file and line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (set SESSIONBERT_SHARED_DATA to the shared data folder)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != COLUMNS:
        raise ValueError(f"{path}:1: header {list(df.columns)}, expected {COLUMNS}")
    act = pd.to_numeric(df["ActivityID"], errors="coerce")
    ts = pd.to_datetime(df["CompleteTimestamp"], format="%Y-%m-%d %H:%M:%S", errors="coerce", utc=True)
    bad = act.isna() | ts.isna() | (df["CaseID"] == "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}:{i + 2}: bad row {df.iloc[i].tolist()} (need case id, integer activity, "
                         "YYYY-MM-DD HH:MM:SS)")
    return pd.DataFrame({"case": df["CaseID"], "activity": act.astype(np.int64), "timestamp": ts})


def cases(log: pd.DataFrame) -> pd.DataFrame:
    """One row per case in file order: case, activities (list), first timestamp, timestamps (list)."""
    g = log.groupby("case", sort=False)
    return pd.DataFrame({"activities": g["activity"].agg(list), "timestamps": g["timestamp"].agg(list),
                         "start": g["timestamp"].min()}).reset_index()


def load_file(name: str, rel: str, data_dir: Path | None = None) -> Adapted:
    path = Path(data_dir or shared_data_dir()) / rel
    log = read_log(path)
    events = pd.DataFrame({
        "user_id": log["case"].map(lambda c: f"{name}-{c}"),
        "session_id": log["case"].map(lambda c: f"{name}-{c}"),
        "timestamp": log["timestamp"].astype("datetime64[ms, UTC]"),
        "service": None, "page": log["activity"].astype(str), "page_title": None, "action": None, "region": None,
    })
    per_case = log.groupby("case", sort=False).size()
    counts = {"events": int(len(log)), "cases": int(len(per_case)), "activities": int(log["activity"].nunique()),
              "mean_events_per_case": float(per_case.mean()), "max_events_per_case": int(per_case.max())}
    return Adapted(name, events, has_users=False, has_time=True, has_services=False, counts=counts,
                   notes=["case = session = its own user (no user ids)", "activity ids are the pages",
                          "file timestamps (no zone) read as UTC", "no services"])


# ---- evaluation (issue 5): Tax et al. 2017 next-activity protocol ----------------------------------------
def _protocol_name(order: str, min_prefix: int) -> str:
    how = "cases by first event" if order == "chronological" else "cases in file order (as Tax et al.'s code)"
    return (f"Tax et al. 2017: {how}, first 2/3 train, last 1/3 test; every test prefix of >= {min_prefix} "
            "event(s) -> next activity (end of case not scored)")


def evaluate_log(name: str, rel: str, cfg: dict, published: float, published_source: str) -> list:
    """Our model and a first-order Markov floor on each configured variant of the protocol."""
    import logging

    from .base import ResultRow
    from .nextitem import fit_next_item
    from .protocols import accuracy, markov_floor, tax_prefixes, tax_split

    log = logging.getLogger("sessionbert")
    path = Path(cfg.get("data_dir") or shared_data_dir()) / rel
    c = cases(read_log(path))
    acts = sorted({a for s in c["activities"] for a in s})
    index = {a: i for i, a in enumerate(acts)}
    seqs = [[index[a] for a in s] for s in c["activities"]]
    rows = []
    models: dict[str, object] = {}
    for v in cfg["protocols"]:
        order, min_prefix = v["order"], int(v["min_prefix"])
        tr, te = tax_split(c["start"].tolist(), order)
        train, test = [seqs[i] for i in tr], [seqs[i] for i in te]
        if order not in models:  # one model per split, shared by the prefix variants
            models[order] = fit_next_item(train, len(acts), cfg["model"], seed=cfg["seed"])
            log.info("%s %s: %s", name, order, models[order].history[-1])
        prefixes, targets, _ = tax_prefixes(test, min_prefix)
        proto = _protocol_name(order, min_prefix) + f"; {len(tr):,} / {len(te):,} cases, {len(targets):,} prefixes"
        ours = accuracy(models[order].predict(prefixes)[:, 0], targets)
        rows.append(ResultRow(name, "accuracy", proto, ours, published,
                              f"SessionBERT (ours; activity tokens only, no time features) vs published {published_source}"))
        table = markov_floor(train, len(acts))
        rows.append(ResultRow(name, "accuracy", proto, accuracy(table[[p[-1] for p in prefixes]], targets), None,
                              "floor: first-order Markov (ours; most frequent next activity after the last one)"))
    return rows
