"""BPI Challenge 2012, W subprocess (Tax et al. 2017): adapter and the next-activity protocol."""
from __future__ import annotations

from pathlib import Path

from .base import Adapted
from .processlog import load_file

NAME = "bpi12w"
FILE = "process-logs/bpi_12_w.csv"


def load(data_dir: Path | None = None) -> Adapted:
    return load_file(NAME, FILE, data_dir)


def evaluate(cfg: dict) -> list:
    from .processlog import evaluate_log

    return evaluate_log(NAME, FILE, cfg, 0.76, "Tax et al. 2017 LSTM 0.76 (CAiSE 2017)")
