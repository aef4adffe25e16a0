"""Helpdesk ticket log (Tax et al. 2017): adapter and the next-activity protocol (see processlog, protocols)."""
from __future__ import annotations

from pathlib import Path

from .base import Adapted
from .processlog import load_file

NAME = "helpdesk"
FILE = "process-logs/helpdesk.csv"


def load(data_dir: Path | None = None) -> Adapted:
    return load_file(NAME, FILE, data_dir)
