"""Amazon Beauty (S3-Rec / ICLRec version): adapter and published protocols (leave-one-out, full ranking over all
12,101 items, and the 99-sampled-negatives variant) with our BERT next-item model beside the published numbers.

Item metadata: Beauty_item2attributes.json gives each item 1..N anonymised attribute ids that S3-Rec describes as
its categories and brand; the file does not say which id is which. We keep them all (page_title lists them, the
model can add their mean embedding to the item's) and, as the "service", take the item's attribute that is most
frequent over the catalogue (the most general one, a category proxy, not a labelled category).
There are no timestamps, only order: events keep each user's file order and carry no time.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from sessionbert.realdata import _beauty_core as core
from sessionbert.realdata.base import Adapted, ResultRow, shared_data_dir

log = logging.getLogger("sessionbert.realdata.beauty")
DATASET = "beauty"
FULL = "leave-one-out (last item test, second-to-last validation), full ranking over all 12,101 items, " \
       "items already in the user's history removed"
SAMPLED = "leave-one-out, {n} sampled negatives (uniform over items the user never interacted with, seed {seed})"

#: Published full-ranking numbers (shared/data/README.md: S3-Rec authors' figure, ICLRec README).
PUBLISHED_FULL = {
    "PopRec": {"HR@5": 0.0080, "NDCG@5": 0.0044, "HR@10": 0.0152, "NDCG@10": 0.0068, "HR@20": 0.0217},
    "GRU4Rec": {"HR@5": 0.0164, "NDCG@5": 0.0099, "HR@10": 0.0283, "NDCG@10": 0.0137, "HR@20": 0.0479},
    "BERT4Rec": {"HR@5": 0.0203, "NDCG@5": 0.0124, "HR@10": 0.0347, "NDCG@10": 0.0170, "HR@20": 0.0599},
    "SASRec": {"HR@5": 0.0387, "NDCG@5": 0.0249, "HR@10": 0.0605, "NDCG@10": 0.0318, "HR@20": 0.0902},
    "S3-Rec": {"HR@5": 0.0387, "NDCG@5": 0.0244, "HR@10": 0.0647, "NDCG@10": 0.0327, "HR@20": 0.0994},
    "ICLRec": {"HR@5": 0.0500, "NDCG@5": 0.0326, "HR@10": 0.0744, "NDCG@10": 0.0403, "HR@20": 0.1058},
}
#: Published 99-negative HR@5 (S3-Rec paper, main table).
PUBLISHED_SAMPLED = {"BERT4Rec": 0.3640, "SASRec": 0.3741, "S3-Rec": 0.4502}
SOURCES = {"ICLRec": "ICLRec README (Chen et al., WWW 2022)"}
_S3 = "S3-Rec authors' full-ranking figure (Zhou et al., CIKM 2020)"


def _dir(data_dir: Path | None) -> Path:
    return Path(data_dir) if data_dir else shared_data_dir() / "amazon-beauty"


def category_proxy(attrs: dict[int, list[int]]) -> dict[int, int | None]:
    """Each item's attribute that is most frequent over the catalogue (ties: the smaller id)."""
    freq = Counter(a for v in attrs.values() for a in v)
    return {it: (min(v, key=lambda a: (-freq[a], a)) if v else None) for it, v in attrs.items()}


def load(data_dir: Path | None = None) -> Adapted:
    """One row per (user, item) in the user's order; session = user (the file has one sequence per user)."""
    data = core.read_beauty(_dir(data_dir))
    cat = category_proxy(data.attrs)
    rows = []
    for u, s in zip(data.users, data.seqs):
        uid = str(u)
        for it in s:
            a = data.attrs.get(it, [])
            rows.append((uid, uid, "" if cat.get(it) is None else f"attr{cat[it]}", str(it),
                         " ".join(f"attr{x}" for x in a)))
    ev = pd.DataFrame(rows, columns=["user_id", "session_id", "service", "page", "page_title"])
    ev.insert(2, "timestamp", pd.Series(pd.NaT, index=ev.index, dtype="datetime64[ms, UTC]"))
    ev["action"] = "review"
    ev["region"] = None
    lens = np.array([len(s) for s in data.seqs])
    items = {i for s in data.seqs for i in s}
    counts = {
        "users": len(data.seqs), "items": len(items), "max_item_id": data.n_items,
        "interactions": int(lens.sum()), "seq_len_mean": round(float(lens.mean()), 2),
        "seq_len_min": int(lens.min()), "seq_len_max": int(lens.max()),
        "attr_items": len(data.attrs), "attr_distinct": len({a for v in data.attrs.values() for a in v}),
        "attr_mean_per_item": round(float(np.mean([len(v) for v in data.attrs.values()])), 2),
    }
    return Adapted(
        name=DATASET, events=ev, has_users=True, has_time=False, has_services=True, counts=counts,
        notes=["no timestamps: rows keep each user's chronological file order (a time split is not possible)",
               "page = item id, page_title = its anonymised attribute ids; service = the item's most frequent "
               "attribute over the catalogue (a category proxy: the file does not label categories vs brands)",
               "one sequence per user (session = user)"],
    )


def rows_from_results(res: dict, seed: int, n_negatives: int = 99) -> list[ResultRow]:
    """Result rows (one per published number, ours beside it, plus our floors) from `core.run`'s output."""
    rows = []
    ours, pop = res["ours"], res["popularity"]
    for model, vals in PUBLISHED_FULL.items():
        for metric, pub in vals.items():
            mine = pop if model == "PopRec" else ours
            who = "popularity (ours)" if model == "PopRec" else "SessionBERT (ours)"
            src = SOURCES.get(model, _S3)
            rows.append(ResultRow(DATASET, metric, FULL, mine[metric], pub, f"{model}, {src}; ours: {who}"))
    rows.append(ResultRow(DATASET, "NDCG@20", FULL, ours["NDCG@20"], None, "SessionBERT (ours)"))
    for metric in ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20"):
        rows.append(ResultRow(DATASET, metric, FULL, pop[metric], None, "floor (ours): popularity"))
    sampled = SAMPLED.format(seed=seed, n=n_negatives)
    for model, pub in PUBLISHED_SAMPLED.items():
        rows.append(ResultRow(DATASET, "HR@5", sampled, res["ours_sampled99"]["HR@5"], pub,
                              f"{model}, S3-Rec paper main table (Zhou et al., CIKM 2020); ours: SessionBERT"))
    for metric, v in res["ours_sampled99"].items():
        if metric != "HR@5":
            rows.append(ResultRow(DATASET, metric, sampled, v, None, "SessionBERT (ours)"))
    for metric, v in res["popularity_sampled99"].items():
        rows.append(ResultRow(DATASET, metric, sampled, v, None, "floor (ours): popularity"))
    return rows


def evaluate(cfg: dict) -> list[ResultRow]:
    """cfg: the `realdata` node of conf/experiment/real_beauty.yaml (or a config holding it).
    With `results_json` set, the rows are built from a finished run's JSON (e.g. the GPU run of
    experiments/real_beauty_gpu.sh) instead of training again."""
    if "realdata" in cfg:  # the whole experiment file rather than its realdata node
        cfg = cfg["realdata"]
    seed = int(cfg.get("seed", 0))
    if cfg.get("results_json"):
        p = Path(cfg["results_json"])
        if not p.is_absolute():
            p = Path(__file__).resolve().parents[2] / p
        if not p.exists():
            raise FileNotFoundError(
                f"realdata.results_json: {p} not found: run experiments/real_beauty_gpu.sh on a GPU and copy its "
                "$OUT to experiments/results/beauty_gpu/, or set realdata.results_json=null to train here (hours "
                "on a CPU)")
        res = json.loads(p.read_text())
    else:
        from sessionbert.realdata._itembert import cpu_threads
        device = cfg.get("device", "cpu")
        with cpu_threads(cfg.get("cpu_threads", 1) if device == "cpu" else None):
            res = core.run(cfg, _dir(cfg.get("dir")), device)
    return rows_from_results(res, seed, int(cfg.get("n_negatives", 99)))
