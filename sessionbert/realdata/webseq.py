"""Evaluation shared by the web-session datasets without users or time (msnbc, fifa): the CPT+ protocol with
the `cpt` package (CPT+) as the reference on the same folds, and the 80/20 file-order next-event split
against the first-order Markov floor."""
from __future__ import annotations

import logging
import time

import numpy as np

from .base import ResultRow
from .nextitem import fit_next_item
from .protocols import (
    cptplus_folds,
    cptplus_hit,
    cptplus_query,
    file_order_split,
    markov_floor,
)
from .seqio import collapse_repeats

log = logging.getLogger("sessionbert")


def cptplus_protocol_name(min_len: int, max_count: int | None, folds: int, window: int, suffix: int) -> str:
    first = f"first {max_count:,} " if max_count else "all "
    return (f"CPT+ protocol (IPredict): consecutive repeats collapsed, length >= {min_len}, {first}sequences, "
            f"{folds}-fold CV, prefix = last {window} items before a suffix of {suffix}, hit if predicted item in suffix")


def run_cpt_reference(data: list[list[int]], folds, window: int, suffix: int, params: dict) -> float:
    """Accuracy of CPT+ (PyPI `cpt`, Cython CPT/CPT+) on the same folds and queries."""
    from cpt.cpt import Cpt

    hits = n = 0
    for tr, te in folds:
        m = Cpt(**params)
        m.fit([[str(x) for x in data[i]] for i in tr])
        qs = [cptplus_query(data[i], window, suffix) for i in te]
        preds = m.predict([[str(x) for x in q] for q, _ in qs], multithreading=False)
        hits += sum(cptplus_hit(None if p is None else int(p), s) for p, (_, s) in zip(preds, qs))
        n += len(qs)
    return hits / n


def run_ours_cptplus(data: list[list[int]], folds, window: int, suffix: int, n_items: int, model_cfg: dict,
                     seed: int, init=None) -> tuple[float, list[float]]:
    """Our model on the same folds: fine-tuned on each fold's training sequences (from `init` when given)."""
    hits = n = 0
    per_fold = []
    for f, (tr, te) in enumerate(folds):
        t0 = time.perf_counter()
        m = fit_next_item([data[i] for i in tr], n_items, model_cfg, seed=seed + f, init=init)
        qs = [cptplus_query(data[i], window, suffix) for i in te]
        pred = m.predict([q for q, _ in qs])[:, 0]
        h = sum(cptplus_hit(int(p), s) for p, (_, s) in zip(pred, qs))
        per_fold.append(h / len(qs))
        hits, n = hits + h, n + len(qs)
        log.info("cptplus fold %d: %.4f (%.0fs)", f, per_fold[-1], time.perf_counter() - t0)
    return hits / n, per_fold


def evaluate_cptplus(name: str, data: list[list[int]], n_items: int, cfg: dict, init=None, init_note: str = "",
                     published: float | None = None, published_source: str = "") -> list[ResultRow]:
    """Rows: ours and the CPT+ reference(s) on the CPT+ protocol; `data` already filtered by cptplus_sequences.
    `init`: an MLM-pretrained model (on sequences disjoint from every fold) each fold starts from."""
    p = cfg["cptplus"]
    folds = cptplus_folds(len(data), p["folds"])
    proto = cptplus_protocol_name(p["min_len"], p.get("max_count"), p["folds"], p["window"], p["suffix"])
    rows = []
    mcfg = dict(cfg["model"])
    acc, per_fold = run_ours_cptplus(data, folds, p["window"], p["suffix"], n_items, mcfg, cfg["seed"], init)
    how = f"{init_note}, " if init is not None else "MLM on each fold's training sequences, "
    rows.append(ResultRow(name, "accuracy_cptplus_protocol", proto, acc, published,
                          f"SessionBERT (ours; {how}fine-tuned per fold; fold sd {np.std(per_fold):.3f})"
                          + (f" vs published {published_source}" if published_source else "")))
    for params in p.get("reference", []):
        t0 = time.perf_counter()
        ref = run_cpt_reference(data, folds, p["window"], p["suffix"], dict(params))
        log.info("%s CPT+ %s: %.4f (%.0fs)", name, params, ref, time.perf_counter() - t0)
        rows.append(ResultRow(name, "accuracy_cptplus_protocol", proto, ref, published,
                              f"reference: CPT+ (PyPI cpt, {', '.join(f'{k}={v}' for k, v in params.items())}) "
                              "on the same folds, this run"))
    return rows


def _sample_events(test: list[list[int]], cap: int | None, rng: np.random.Generator):
    """Every next event of the test sequences (or a uniform sample of `cap`): (prefixes, targets)."""
    counts = np.array([max(len(s) - 1, 0) for s in test], dtype=np.int64)
    total = int(counts.sum())
    cum = np.cumsum(counts)
    pos = np.arange(total) if cap is None or cap >= total else np.sort(rng.choice(total, size=cap, replace=False))
    which = np.searchsorted(cum, pos, side="right")
    ts = pos - (cum[which] - counts[which]) + 1
    prefixes = [test[i][:t] for i, t in zip(which.tolist(), ts.tolist())]
    targets = np.array([test[i][t] for i, t in zip(which.tolist(), ts.tolist())], dtype=np.int64)
    return prefixes, targets, total


def evaluate_file_order(name: str, seqs: list[list[int]], n_items: int, cfg: dict,
                        published: dict[str, float]) -> list[ResultRow]:
    """80/20 file-order split, every next event: first-order Markov floor (all test events) and, on a stated
    random sample of test events, the Markov floor again and our model. Variants: raw, repeats collapsed."""
    fo = cfg["file_order"]
    rows = []
    for variant in fo["variants"]:
        S = seqs if variant == "raw" else [collapse_repeats(s) for s in seqs]
        tr, te = file_order_split(len(S), fo["train_frac"])
        train, test = [S[i] for i in tr], [S[i] for i in te]
        table = markov_floor(train, n_items)
        hits = tot = 0
        for s in test:
            a = np.asarray(s)
            if len(a) > 1:
                hits += int((table[a[:-1]] == a[1:]).sum())
                tot += len(a) - 1
        what = "consecutive repeats kept" if variant == "raw" else "consecutive repeats collapsed"
        proto = f"file order: first {fo['train_frac']:.0%} sessions train, last {1 - fo['train_frac']:.0%} test, every next event, {what}"
        rows.append(ResultRow(name, "hit@1", proto, hits / tot, published.get(variant),
                              f"floor: first-order Markov (ours, all {tot:,} test events; published value from the data README)"))
        rng = np.random.default_rng(cfg["seed"])
        prefixes, targets, total = _sample_events(test, fo.get("eval_max_events"), rng)
        mk = float(np.mean(table[[p[-1] for p in prefixes]] == targets))
        mcfg = dict(cfg["model"], **fo.get("model_overrides", {}))
        t0 = time.perf_counter()
        model = fit_next_item(train, n_items, mcfg, seed=cfg["seed"])
        ours = float(np.mean(model.predict(prefixes)[:, 0] == targets))
        log.info("%s file-order %s: ours %.4f markov %.4f (%.0fs)", name, variant, ours, mk, time.perf_counter() - t0)
        sample = f"random sample of {len(targets):,} of the {total:,} test events (seed {cfg['seed']})" \
            if len(targets) < total else f"all {total:,} test events"
        rows.append(ResultRow(name, "hit@1", proto + f"; {sample}", ours, None,
                              f"SessionBERT (ours; trained on the training split, fine-tune pool "
                              f"{mcfg.get('ft_max_pool') or 'all'} prefixes)"))
        rows.append(ResultRow(name, "hit@1", proto + f"; {sample}", mk, None,
                              "floor: first-order Markov (ours) on the same sample"))
    return rows
