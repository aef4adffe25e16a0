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
    t = pd.to_datetime(events["timestamp"], utc=True)
    before = events.loc[t < split.test_start, ["user_id", "service"]].drop_duplicates()
    used: dict[str, set[str]] = before.groupby("user_id")["service"].agg(set).to_dict()
    after = events.loc[t >= split.test_start, ["user_id", "service"]].drop_duplicates()
    adopted: dict[str, set[str]] = {}
    for user, services in after.groupby("user_id")["service"]:
        prior = used.get(user)
        if prior is None:
            continue
        new = set(services) - prior
        if new:
            adopted[user] = new
    return used, adopted


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
    df = first.to_pandas()
    before = pd.to_datetime(df["timestamp_min_min"], utc=True) < test_start
    used = df.loc[before].groupby("user_id")["service"].agg(set).to_dict()
    new = df.loc[~before & df["user_id"].isin(used.keys())]
    adopted = new.groupby("user_id")["service"].agg(set).to_dict()
    return used, adopted
