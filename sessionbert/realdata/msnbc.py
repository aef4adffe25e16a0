"""MSNBC.com anonymous web data (UCI), read in place from ``msnbc/msnbc990928.zip``.

17 page categories (the names in the file header) are the pages; each line is one visitor's day, so it is
both the user and the session (no user ids link lines: has_users False); no timestamps (has_time False);
no services (the categories are the pages themselves).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .base import Adapted, shared_data_dir
from .seqio import parse_int_lines, sequences_to_events

NAME = "msnbc"
ZIP = "msnbc/msnbc990928.zip"
MEMBER = "msnbc990928.seq"
HEADER_LINES = 7  # SOURCE.md: 7 header lines, categories on line 3, sequences from line 8


def read_raw(data_dir: Path | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(category names, 1-based category ids flat, line offsets); the zip is read in place, never unpacked."""
    path = Path(data_dir or shared_data_dir()) / ZIP
    if not path.exists():
        raise FileNotFoundError(f"msnbc: {path} not found (set SESSIONBERT_SHARED_DATA to the shared data folder)")
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if not n.startswith("__MACOSX")]  # skip the macOS resource fork
        if MEMBER not in names:
            raise ValueError(f"msnbc: {path} has no {MEMBER} (members: {names})")
        body = z.read(MEMBER)
    head = body.split(b"\n", HEADER_LINES)
    if len(head) <= HEADER_LINES or not head[0].startswith(b"% Different categories"):
        raise ValueError(f"{path}:{MEMBER}:1: unexpected header {head[0][:60]!r}")
    categories = head[2].decode().split()
    values, offsets = parse_int_lines(head[HEADER_LINES], f"{path}:{MEMBER}", first_line=HEADER_LINES + 1)
    if len(values) and (values.min() < 1 or values.max() > len(categories)):
        bad = int(np.flatnonzero((values < 1) | (values > len(categories)))[0])
        line = int(np.searchsorted(offsets, bad, side="right")) + HEADER_LINES
        raise ValueError(f"{path}:{MEMBER}:{line}: category id {values[bad]} outside 1..{len(categories)}")
    return categories, values, offsets


def sequences(data_dir: Path | None = None) -> tuple[list[str], list[list[int]]]:
    """(category names, every line as a list of 0-based category indices)."""
    cats, values, offsets = read_raw(data_dir)
    v = values - 1
    return cats, [v[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def load(data_dir: Path | None = None, max_lines: int | None = None) -> Adapted:
    cats, values, offsets = read_raw(data_dir)
    if max_lines is not None:
        offsets = offsets[: max_lines + 1]
        values = values[: offsets[-1]]
    events = sequences_to_events(values - 1, offsets, np.array(cats, dtype=object), "msnbc-")
    lens = np.diff(offsets)
    counts = {"sessions": int(len(lens)), "users": int(len(lens)), "events": int(len(values)),
              "categories": len(cats), "categories_used": int(len(np.unique(values))),
              "sessions_ge2": int((lens >= 2).sum()), "max_len": int(lens.max()) if len(lens) else 0}
    return Adapted(NAME, events, has_users=False, has_time=False, has_services=False, counts=counts,
                   notes=["one line = one visitor's day = user and session (no ids link lines)",
                          "pages are the 17 categories of the file header; no timestamps; no services"])


# ---- evaluation (issue 5) ------------------------------------------------------------------------------
def cptplus_subset(seqs: list[list[int]], min_len: int, max_count: int) -> tuple[list[list[int]], int]:
    """(the CPT+ sequences, index of the file line holding the last of them): lines after it are disjoint
    from every cross-validation fold, so they may be used for MLM pretraining."""
    from .protocols import cptplus_sequences
    from .seqio import collapse_repeats

    data = cptplus_sequences(seqs, min_len, max_count)
    n = 0
    for i, s in enumerate(seqs):
        if len(collapse_repeats(s)) >= min_len:
            n += 1
            if n == len(data):
                return data, i
    return data, len(seqs) - 1


def evaluate(cfg: dict) -> list:
    """CPT+ protocol (ours vs the cpt package's CPT+ on the same folds), 80/20 file-order split vs the Markov
    floors, and personas (silhouette over k, clusters' top categories)."""
    from .nextitem import pretrain_mlm
    from .seqio import collapse_repeats
    from .webseq import evaluate_cptplus, evaluate_file_order

    cats, seqs = sequences(cfg.get("data_dir"))
    p = cfg["cptplus"]
    data, last_line = cptplus_subset(seqs, p["min_len"], p["max_count"])
    pre_cfg = cfg["pretrain"]
    rest = [c for c in (collapse_repeats(s) for s in seqs[last_line + 1:]) if len(c) >= 2][: pre_cfg["max_sessions"]]
    init = pretrain_mlm(rest, len(cats), cfg["model"], seed=cfg["seed"])
    note = (f"MLM-pretrained once on {len(rest):,} later sessions (file lines after the CPT+ subset, repeats "
            "collapsed, >= 2 items), disjoint from every fold")
    rows = evaluate_cptplus(NAME, data, len(cats), cfg, init=init, init_note=note, published=0.61,
                            published_source="CPT+ about 0.61 (Gueniche et al., PAKDD 2015)")
    rows += evaluate_file_order(NAME, seqs, len(cats), cfg, published={"raw": 0.653, "collapsed": 0.286})
    if cfg.get("personas"):
        from .personas import evaluate_personas

        rows += evaluate_personas(NAME, seqs, cats, init, cfg, cfg.get("out_dir"))
    return rows
