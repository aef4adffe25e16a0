"""FIFA World Cup 98 web sessions (IPredict ``FIFA.dat``): one session per line of page ids.

Pages are the ids themselves (no titles). No user ids (each line its own user), no timestamps, no services.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Adapted, shared_data_dir
from .seqio import parse_int_lines, sequences_to_events

NAME = "fifa"
FILE = "fifa-worldcup98/FIFA.dat"


def read_raw(data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(page ids flat, line offsets)."""
    path = Path(data_dir or shared_data_dir()) / FILE
    if not path.exists():
        raise FileNotFoundError(f"fifa: {path} not found (set SESSIONBERT_SHARED_DATA to the shared data folder)")
    return parse_int_lines(path.read_bytes(), str(path))


def sequences(data_dir: Path | None = None) -> tuple[list[str], list[list[int]]]:
    """(page names = the ids as strings, sorted numerically; every session as 0-based page indices)."""
    values, offsets = read_raw(data_dir)
    uniq, idx = np.unique(values, return_inverse=True)
    return [str(u) for u in uniq], [idx[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def load(data_dir: Path | None = None, max_lines: int | None = None) -> Adapted:
    values, offsets = read_raw(data_dir)
    if max_lines is not None:
        offsets = offsets[: max_lines + 1]
        values = values[: offsets[-1]]
    uniq, idx = np.unique(values, return_inverse=True)
    events = sequences_to_events(idx, offsets, np.array([str(u) for u in uniq], dtype=object), "fifa-")
    lens = np.diff(offsets)
    counts = {"sessions": int(len(lens)), "events": int(len(values)), "pages": int(len(uniq)),
              "mean_len": float(lens.mean()), "median_len": float(np.median(lens)), "max_len": int(lens.max()),
              "sessions_ge6": int((lens >= 6).sum())}
    return Adapted(NAME, events, has_users=False, has_time=False, has_services=False, counts=counts,
                   notes=["one line = one session = its own user (no user ids)", "pages are the integer ids",
                          "no timestamps; no services"])


# ---- evaluation (issue 5) ------------------------------------------------------------------------------
def evaluate(cfg: dict) -> list:
    """CPT+ protocol (ours vs the cpt package's CPT+, same folds; CPT+'s published FIFA numbers are on another
    sample of the logs, so none is quoted) and the 80/20 file-order split vs the Markov floor."""
    from .protocols import cptplus_sequences
    from .webseq import evaluate_cptplus, evaluate_file_order

    names, seqs = sequences(cfg.get("data_dir"))
    p = cfg["cptplus"]
    data = cptplus_sequences(seqs, p["min_len"], p.get("max_count"))
    rows = evaluate_cptplus(NAME, data, len(names), cfg)
    rows += evaluate_file_order(NAME, seqs, len(names), cfg, published={"raw": 0.148})
    return rows
