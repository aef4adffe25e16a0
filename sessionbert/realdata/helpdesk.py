"""Helpdesk ticket log (Tax et al. 2017): adapter and the next-activity protocol (see processlog, protocols)."""
from __future__ import annotations

from pathlib import Path

from .base import Adapted
from .processlog import load_file

NAME = "helpdesk"
FILE = "process-logs/helpdesk.csv"


def load(data_dir: Path | None = None) -> Adapted:
    return load_file(NAME, FILE, data_dir)


def evaluate(cfg: dict) -> list:
    from .processlog import evaluate_log

    return evaluate_log(NAME, FILE, cfg, 0.71, "Tax et al. 2017 LSTM 0.71 (CAiSE 2017)")
