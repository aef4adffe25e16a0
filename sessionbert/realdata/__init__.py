"""Public real session datasets (issue 5): adapters to the event schema, their published protocols, SessionBERT
next-item models and the results runner (``python -m sessionbert.realdata``)."""
from __future__ import annotations

import importlib

import numpy as np
import pandas as pd

DATASETS = ("msnbc", "fifa", "helpdesk", "bpi12w", "msweb", "beauty")


def load_adapted(name: str, data_dir=None, max_lines: int | None = None):
    """The adapter's ``load()`` by dataset name (``data.name`` of a ``data=<name>`` config)."""
    if name not in DATASETS:
        raise ValueError(f"data.name: unknown real dataset {name!r}; known {DATASETS}")
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"data.name: the adapter sessionbert.realdata.{name} is not available ({e})") from e
    if max_lines is not None:
        import inspect

        if "max_lines" not in inspect.signature(mod.load).parameters:
            raise ValueError(f"data.max_lines: the {name} adapter reads whole files only")
        return mod.load(data_dir, max_lines=max_lines)
    return mod.load(data_dir)


def file_order_times(events: pd.DataFrame) -> pd.DataFrame:
    """For data without timestamps: session i (in file order) starts at 1970-01-01 + i minutes, its j-th event
    at + j ms, so the time-ordered stages see the file order and a time split is a file-order split. The
    values are ranks, not times: the pipeline records this in metrics.json (data.realdata.timestamps)."""
    sess = pd.Index(events["session_id"]).unique()
    s_idx = pd.Index(sess).get_indexer(events["session_id"]).astype(np.int64)
    j = events.groupby("session_id", sort=False).cumcount().to_numpy().astype(np.int64)
    if len(j) and j.max() >= 60_000:
        raise ValueError("file_order_times: a session with >= 60,000 events does not fit in its minute")
    ms = s_idx * 60_000 + j
    return events.assign(timestamp=pd.to_datetime(ms, unit="ms", utc=True).astype("datetime64[ms, UTC]"))


def file_order_split_days(n_sessions: int, val_frac: float, test_frac: float) -> tuple[float, float]:
    """(val_days, test_days) that make the time split of `file_order_times` a file-order split by sessions."""
    if not (0 <= val_frac and 0 < test_frac and val_frac + test_frac < 1):
        raise ValueError(f"data.split: need val_frac >= 0, test_frac > 0, sum < 1; got {val_frac}, {test_frac}")
    # the split counts back from the last event (last session start + < 0.5 min); sessions are one minute
    # apart, so test_start falls mid-gap before the last m sessions and val_start mid-gap v sessions earlier
    m = max(1, int(round(test_frac * n_sessions)))
    v = int(round(val_frac * n_sessions))
    return v / 1440, (m - 0.5) / 1440
