"""The published evaluation protocols, as plain functions over sequences of item indices (issue 5).

Each function is named after its protocol and tested on toy inputs in tests/test_realdata.py.

* Tax et al. 2017 (Helpdesk, BPI12-W): ``tax_split`` (cases by first event, first 2/3 train, last 1/3 test)
  and ``tax_prefixes`` (every prefix of every test case -> the next activity). What Tax et al.'s code
  (verenich/ProcessSequencePrediction, evaluate_next_activity_and_time.py) does, checked there:
  the case order is the CSV's order (not re-sorted), prefixes of 2 .. n-1 events are scored (``range(2,
  maxlen)``), the ground truth is the next *activity* (a full case has no next activity and is not scored),
  while the model can still predict the end-of-case symbol (scored as a miss). The paper's text says
  chronological and "every prefix"; our main row follows the text (chronological, prefixes >= 1); the code's
  variant (file order, prefixes >= 2) is a second row. Neither scores end-of-case.
* CPT+ (Gueniche et al. 2015), as in the data README from the authors' IPredict code: ``cptplus_sequences``
  (consecutive duplicates removed, length filter, first N), ``cptplus_folds`` (k contiguous folds),
  ``cptplus_query`` (prefix = the `window` items before the last `suffix` items), ``cptplus_hit``.
* File-order next-event split (data README floors): ``file_order_split``, ``next_event_pairs``,
  ``markov_floor``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .seqio import collapse_repeats


# ---- Tax et al. 2017 --------------------------------------------------------------------------------
def tax_split(starts: Sequence, order: str = "chronological", train_frac: float = 2 / 3) -> tuple[np.ndarray, np.ndarray]:
    """(train case indices, test case indices): cases ordered by first event (stable; ties keep file order)
    or in file order (``order="file"``, as Tax et al.'s code); the first round(2n/3) train, the rest test."""
    n = len(starts)
    if order == "chronological":
        idx = np.asarray(pd.Series(pd.to_datetime(list(starts), utc=True)).sort_values(kind="stable").index)
    elif order == "file":
        idx = np.arange(n)
    else:
        raise ValueError(f"tax_split: order must be 'chronological' or 'file', got {order!r}")
    n_train = int(round(train_frac * n))
    return idx[:n_train], idx[n_train:]


def tax_prefixes(cases: list[list[int]], min_prefix: int = 1) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Every prefix of length >= min_prefix that has a next activity: (prefixes, next activities, case index)."""
    prefixes, targets, case = [], [], []
    for c, seq in enumerate(cases):
        for t in range(min_prefix, len(seq)):
            prefixes.append(list(seq[:t]))
            targets.append(seq[t])
            case.append(c)
    return prefixes, np.asarray(targets, dtype=np.int64), np.asarray(case, dtype=np.int64)


def accuracy(pred: np.ndarray, targets: np.ndarray) -> float:
    """Share of exact next-item matches (pred: (n,) or (n, 1))."""
    pred = np.asarray(pred).reshape(len(targets), -1)[:, 0]
    if len(targets) == 0:
        raise ValueError("accuracy: no prefix to score")
    return float(np.mean(pred == np.asarray(targets)))


# ---- CPT+ (IPredict) --------------------------------------------------------------------------------
def cptplus_sequences(seqs: list[list[int]], min_len: int, max_count: int | None = None) -> list[list[int]]:
    """Consecutive duplicates removed, then sequences of length >= min_len kept, the first max_count of them."""
    out = []
    for s in seqs:
        c = collapse_repeats(s)
        if len(c) >= min_len:
            out.append(c)
            if max_count is not None and len(out) >= max_count:
                break
    return out


def cptplus_folds(n: int, k: int = 14) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-fold cross-validation over n sequences in file order: fold i tests the i-th contiguous block."""
    if not 2 <= k <= n:
        raise ValueError(f"cptplus_folds: need 2 <= k <= n, got k={k}, n={n}")
    blocks = np.array_split(np.arange(n), k)
    return [(np.concatenate([b for j, b in enumerate(blocks) if j != i]), blocks[i]) for i in range(k)]


def cptplus_query(seq: list[int], window: int = 5, suffix: int = 2) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the last `suffix` items are the answer, the `window` items before them the query."""
    if len(seq) < suffix + 1:
        raise ValueError(f"cptplus_query: sequence of {len(seq)} items has no prefix before a suffix of {suffix}")
    return list(seq[max(0, len(seq) - suffix - window):len(seq) - suffix]), list(seq[len(seq) - suffix:])


def cptplus_hit(pred, suffix: list[int]) -> bool:
    """A hit when the predicted item is in the suffix (no prediction, None, is a miss)."""
    return pred is not None and pred in suffix


# ---- file-order split, every next event, first-order Markov floor ------------------------------------
def file_order_split(n: int, train_frac: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """First int(train_frac * n) sequences train, the rest test (the data README floors)."""
    n_train = int(train_frac * n)
    return np.arange(n_train), np.arange(n_train, n)


def next_event_pairs(seqs: list[list[int]]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Every next event with a predecessor: (history prefix, next item, previous item)."""
    return_prefixes, targets, prev = [], [], []
    for s in seqs:
        for t in range(1, len(s)):
            return_prefixes.append(s[:t])
            targets.append(s[t])
            prev.append(s[t - 1])
    return return_prefixes, np.asarray(targets, dtype=np.int64), np.asarray(prev, dtype=np.int64)


def markov_floor(train_seqs: list[list[int]], n_items: int) -> np.ndarray:
    """(n_items,) first-order Markov argmax: the most frequent next item after each item in training
    (ties -> lowest index); an item never followed by anything -> the most frequent item overall.
    Counts over (previous, next) pair codes with np.unique, so a 3,380-page vocabulary stays sparse."""
    pairs = [np.asarray(s, dtype=np.int64) for s in train_seqs if len(s) > 1]
    a = np.concatenate([p[:-1] for p in pairs]) if pairs else np.zeros(0, np.int64)
    b = np.concatenate([p[1:] for p in pairs]) if pairs else np.zeros(0, np.int64)
    allv = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_seqs]) if train_seqs else np.zeros(0, np.int64)
    overall = np.bincount(allv, minlength=n_items)
    table = np.full(n_items, int(overall.argmax()) if len(allv) else 0, dtype=np.int64)
    codes, cnt = np.unique(a * n_items + b, return_counts=True)
    pa, pb = codes // n_items, codes % n_items
    order = np.lexsort((pb, -cnt, pa))  # by previous item, then count descending, then next index
    first = order[np.r_[True, pa[order][1:] != pa[order][:-1]]] if len(order) else order
    table[pa[first]] = pb[first]
    return table
