"""Split by time: train / validation / test windows. The test window is where new-service adoption is scored."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class TimeSplit:
    """Window boundaries (UTC). A session belongs to the window holding its first event."""

    start: pd.Timestamp
    val_start: pd.Timestamp
    test_start: pd.Timestamp
    end: pd.Timestamp

    def window_of(self, session_start: pd.Series) -> np.ndarray:
        """'train' | 'val' | 'test' for each session start time."""
        t = pd.to_datetime(session_start, utc=True)
        return np.where(t >= self.test_start, "test", np.where(t >= self.val_start, "val", "train"))

    def to_dict(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in ("start", "val_start", "test_start", "end")}


def time_split(timestamps: pd.Series, val_days: float, test_days: float) -> TimeSplit:
    """The last `test_days` of the data are the test window, the `val_days` before it validation."""
    if val_days < 0 or test_days <= 0:
        raise ValueError(f"split: need val_days >= 0 and test_days > 0, got {val_days}, {test_days}")
    t = pd.to_datetime(timestamps, utc=True)
    start, end = t.min(), t.max()
    test_start = end - pd.Timedelta(days=test_days)
    val_start = test_start - pd.Timedelta(days=val_days)
    if val_start <= start:
        raise ValueError(
            f"split: the data span {start} .. {end} is too short for val_days={val_days} + test_days={test_days}"
        )
    return TimeSplit(start=start, val_start=val_start, test_start=test_start, end=end)


def session_table(events: pd.DataFrame, split: TimeSplit) -> pd.DataFrame:
    """One row per session: user_id, session_id, start, n_events, window."""
    g = events.groupby("session_id", sort=False)
    s = pd.DataFrame(
        {
            "user_id": g["user_id"].first(),
            "start": g["timestamp"].min(),
            "n_events": g.size(),
        }
    ).reset_index()
    s["window"] = split.window_of(s["start"])
    return s


def used_and_adopted(events: pd.DataFrame, split: TimeSplit) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Services each user used before the test window, and those first used inside it.

    A user counts in `adopted` only when they have at least one event before the test window
    (a user we know nothing about cannot be recommended to) and first use >= 1 service in it.
    """
    first = (events.assign(_t=pd.to_datetime(events["timestamp"], utc=True))
             .groupby(["user_id", "service"], sort=False, observed=True)["_t"].min().reset_index())
    return _used_and_adopted(first["user_id"].to_numpy(object), first["service"].to_numpy(object),
                             (first["_t"] < split.test_start).to_numpy())


def _used_and_adopted(users: np.ndarray, services: np.ndarray, before: np.ndarray
                      ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The rule of `used_and_adopted` from each (user, service) pair's first use: `before` = first used before the
    test window. A service is adopted when first used inside the window by a user with earlier use of anything."""
    used = _sets_by_user(users[before], services[before])
    new = ~before & pd.Index(users).isin(list(used))
    return used, _sets_by_user(users[new], services[new])


def used_and_adopted_file(path, test_start: pd.Timestamp, batch_rows: int = 1 << 22
                          ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """`used_and_adopted` of an events Parquet file too large to load: each (user, service)'s first use is
    aggregated per record batch (pyarrow group_by, three columns read), then over batches, so memory holds the
    (user, service) pairs, never the events. Equal to `used_and_adopted` of the whole table (tested)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for b in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["user_id", "service", "timestamp"]):
        parts.append(pa.Table.from_batches([b]).group_by(["user_id", "service"]).aggregate([("timestamp", "min")]))
    if not parts:
        return {}, {}
    first = pa.concat_tables(parts).group_by(["user_id", "service"]).aggregate([("timestamp_min", "min")])
    before = (pd.to_datetime(first.column("timestamp_min_min").to_pandas(), utc=True) < test_start).to_numpy()
    return _used_and_adopted(first.column("user_id").to_numpy(zero_copy_only=False),
                             first.column("service").to_numpy(zero_copy_only=False), before)


def _sets_by_user(users: np.ndarray, services: np.ndarray) -> dict[str, set[str]]:
    """{user: set of its services} of parallel arrays: users factorised, rows grouped by a stable sort, one slice
    per user (pandas' groupby(...).agg(set) runs a Python function per group: 60% of the time at 1M sessions)."""
    codes, uniq = pd.factorize(users)
    order = np.argsort(codes, kind="stable")
    cuts = np.flatnonzero(np.diff(codes[order])) + 1
    groups = np.split(services[order], cuts) if len(order) else []
    return {uniq[codes[order[g0]]]: set(g.tolist()) for g0, g in zip(np.concatenate([[0], cuts]), groups)}
