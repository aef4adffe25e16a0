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
