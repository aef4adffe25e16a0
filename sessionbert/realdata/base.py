"""Shared contract of the public-dataset adapters (issue 5).

Every adapter module in this package (msnbc, fifa, helpdesk, bpi12w, msweb, beauty) exposes

* ``load(data_dir: Path | None = None) -> Adapted``: the original files (read in place from ``../shared/data``,
  never downloaded, never unpacked to disk) turned into our event schema (``sessionbert.data.schema``);
* ``evaluate(cfg: dict) -> list[ResultRow]``: the dataset's published protocol(s), our model and the
  reference/floor baselines, one row per published number plus our floors.

What a dataset lacks is stated in ``Adapted`` (``has_users`` / ``has_time`` / ``has_services``) so stages that
need it are skipped with that reason, never faked.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

#: Columns of experiments/results/real_data.csv, in order.
RESULT_COLUMNS = ("dataset", "metric", "protocol", "ours", "published", "source")


def shared_data_dir() -> Path:
    """``$SESSIONBERT_SHARED_DATA``, else the nearest ``shared/data`` folder beside the repository or beside one of
    its parent folders (a checkout nested deeper, e.g. a CI clone, still finds the workplace's data), else the
    ``shared/data`` beside the repository (which may not exist: callers say so)."""
    env = os.environ.get("SESSIONBERT_SHARED_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for parent in repo.parents:
        if (parent / "shared" / "data" / "README.md").is_file():
            return parent / "shared" / "data"
    return repo.parent / "shared" / "data"


@dataclass
class Adapted:
    """A public dataset in our event schema plus what it can and cannot support."""

    name: str
    events: pd.DataFrame  # EVENT_SCHEMA columns (timestamp may be NaT only when has_time is False)
    has_users: bool  # user ids that link several sessions
    has_time: bool  # real timestamps (a time split is possible)
    has_services: bool  # something that plays the role of a service (area, item category, ...)
    counts: dict = field(default_factory=dict)  # the counts SOURCE.md states, measured on load
    notes: list[str] = field(default_factory=list)

    def missing(self) -> list[str]:
        return [w for w, ok in (("user ids", self.has_users), ("timestamps", self.has_time),
                                ("services", self.has_services)) if not ok]


@dataclass
class ResultRow:
    dataset: str
    metric: str  # e.g. "HR@5", "accuracy", "Hit@5"
    protocol: str  # named as published, e.g. "leave-one-out, full ranking over 12,101 items"
    ours: float | None  # None: not run (say why in `source`)
    published: float | None  # None for our own floors
    source: str  # who published it (paper, table) or "floor (ours)"; model name for the row

    def as_dict(self) -> dict:
        return asdict(self)
