"""Amazon Beauty (S3-Rec / ICLRec file): reading, leave-one-out split, full-ranking and 99-negative evaluation,
popularity floor and our BERT next-item model. numpy + torch (+ pyyaml for the CLI) only, so that

    python -m sessionbert.realdata._beauty_core --config conf/experiment/real_beauty.yaml --device cuda --out R.json

runs on a bare GPU machine; ``sessionbert.realdata.beauty`` wraps it in the adapter contract.

Protocol (S3-Rec repo ``all_rank`` / ICLRec ``full_sort``): per user the last item is the test target, the
second-to-last the validation target, the rest training. Test input = every item but the last; validation
input = every item but the last two. Full ranking scores all 12,101 items; the items already in the input are
removed from the ranking (ICLRec sets their scores to 0 before its top-k; removing them outright is the intent
and changes nothing here, since no user repeats an item in this file, checked in tests). HR@k = target in the
top k; NDCG@k = 1 / log2(rank + 1). The 99-negative variant (S3-Rec paper tables) ranks the target among 99
items drawn uniformly, without replacement, from the items the user never interacted with (seeded).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("sessionbert.realdata.beauty")

SEQ_FILE, ATTR_FILE = "Beauty.txt", "Beauty_item2attributes.json"
KS = (5, 10, 20)


@dataclass
class BeautyData:
    users: list[int]
    seqs: list[list[int]]  # item ids as in the file (1-based), time order
    attrs: dict[int, list[int]]  # item id -> attribute ids
    n_items: int


def read_sequences(path: Path) -> tuple[list[int], list[list[int]]]:
    users, seqs = [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                ids = [int(x) for x in parts]
            except ValueError:
                raise ValueError(f"{path}:{n}: non-integer id in {line.strip()[:80]!r}") from None
            if len(ids) < 2:
                raise ValueError(f"{path}:{n}: user {ids[0]} has no items")
            if min(ids[1:]) < 1:
                raise ValueError(f"{path}:{n}: item ids start at 1")
            users.append(ids[0])
            seqs.append(ids[1:])
    if not seqs:
        raise ValueError(f"{path}: no users")
    return users, seqs


def read_attrs(path: Path) -> dict[int, list[int]]:
    with open(path, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object item id -> [attribute ids]")
    try:
        return {int(k): [int(a) for a in v] for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: item ids and attribute ids must be integers ({e})") from None


def read_beauty(data_dir: str | Path) -> BeautyData:
    d = Path(data_dir)
    for f in (SEQ_FILE, ATTR_FILE):
        if not (d / f).exists():
            raise FileNotFoundError(f"beauty: {d / f} not found (data dir / $SESSIONBERT_SHARED_DATA)")
    users, seqs = read_sequences(d / SEQ_FILE)
    attrs = read_attrs(d / ATTR_FILE)
    n_items = max(max(s) for s in seqs)
    return BeautyData(users, seqs, attrs, n_items)


# ---------------------------------------------------------------------------------------------------------------
# split and evaluation

def loo_split(seqs: list[list[int]], stage: str) -> tuple[list[list[int]], np.ndarray]:
    """Leave-one-out inputs and targets, 0-based item columns. stage: "test" (input all but the last item,
    target the last) or "valid" (all but the last two, target the second-to-last). Users need >= 3 items."""
    cut = {"test": 1, "valid": 2}[stage]
    inputs, targets = [], []
    for s in seqs:
        if len(s) < 3:
            raise ValueError("leave-one-out needs >= 3 items per user (the file is 5-core)")
        inputs.append([i - 1 for i in s[:-cut]])
        targets.append(s[-cut] - 1)
    return inputs, np.asarray(targets)


def train_part(seqs: list[list[int]]) -> list[list[int]]:
    """Training sequences (0-based): all but the last two items of each user."""
    return [[i - 1 for i in s[:-2]] for s in seqs]


def full_ranks(scores: np.ndarray, inputs: list[list[int]], targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target among all items, the input (history) items removed."""
    from sessionbert.realdata._itembert import ranks_of_targets
    return ranks_of_targets(scores, targets, exclude=inputs)


def full_rank_metrics(scores: np.ndarray, inputs: list[list[int]], targets: np.ndarray) -> dict[str, float]:
    from sessionbert.realdata._itembert import hr_ndcg
    return hr_ndcg(full_ranks(scores, inputs, targets), KS)


def sample_negatives(seqs: list[list[int]], n_items: int, n_neg: int, seed: int) -> np.ndarray:
    """(U, n_neg) 0-based items the user never interacted with, uniform without replacement."""
    g = np.random.default_rng(seed)
    out = np.empty((len(seqs), n_neg), dtype=np.int64)
    for u, s in enumerate(seqs):
        seen = {i - 1 for i in s}
        if n_items - len(seen) < n_neg:
            raise ValueError(f"user {u}: only {n_items - len(seen)} unseen items for {n_neg} negatives")
        got: list[int] = []
        while len(got) < n_neg:
            for c in g.choice(n_items, size=min(2 * n_neg, n_items), replace=False):
                if c not in seen and c not in got:
                    got.append(int(c))
                    if len(got) == n_neg:
                        break
        out[u] = got
    return out


def sampled_ranks(scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Rank of the target among itself + its sampled negatives (ties count against the target)."""
    t = scores[np.arange(len(scores)), targets]
    neg = np.take_along_axis(scores, negatives, axis=1)
    return 1 + (neg >= t[:, None]).sum(1)


def sampled_metrics(ranks: np.ndarray) -> dict[str, float]:
    from sessionbert.realdata._itembert import hr_ndcg
    m = hr_ndcg(ranks, (1, 5, 10))
    return {k: v for k, v in m.items() if k != "NDCG@1"}


def model_ranks(model, inputs: list[list[int]], targets: np.ndarray, negatives: np.ndarray | None = None,
                device: str = "cpu", batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-ranking ranks (and sampled-negative ranks) of a next-item model, scored batch by batch."""
    from sessionbert.realdata._itembert import score_batches
    full = np.zeros(len(inputs), dtype=np.int64)
    samp = np.zeros(len(inputs), dtype=np.int64) if negatives is not None else None
    for idx, sc in score_batches(model, inputs, causal=True, append_mask=False, device=device,
                                 batch_size=batch_size):
        full[idx] = full_ranks(sc, [inputs[i] for i in idx], targets[idx])
        if negatives is not None:
            samp[idx] = sampled_ranks(sc, targets[idx], negatives[idx])
    return full, samp


def popularity(train_seqs: list[list[int]], n_items: int) -> np.ndarray:
    """PopRec: #training interactions per item (validation and test items not counted): (n_items,)."""
    c = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_seqs]), minlength=n_items)
    return c.astype(np.float32)


def popularity_ranks(pop: np.ndarray, inputs: list[list[int]], targets: np.ndarray,
                     negatives: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    full = np.zeros(len(inputs), dtype=np.int64)
    samp = np.zeros(len(inputs), dtype=np.int64)
    for b in range(0, len(inputs), batch_size):
        sl = slice(b, b + batch_size)
        sc = np.tile(pop, (len(targets[sl]), 1))
        full[sl] = full_ranks(sc, inputs[sl], targets[sl])
        samp[sl] = sampled_ranks(sc, targets[sl], negatives[sl])
    return full, samp


def attr_matrix(attrs: dict[int, list[int]], n_items: int):
    """(2 + n_items, A) attribute ids + 1, 0-padded, rows aligned with ItemBert tokens; and the vocabulary size."""
    import torch

    from sessionbert.realdata._itembert import FIRST
    ids = sorted({a for v in attrs.values() for a in v})
    col = {a: j + 1 for j, a in enumerate(ids)}
    width = max((len(v) for v in attrs.values()), default=1)
    m = torch.zeros(FIRST + n_items, width, dtype=torch.long)
    for it, v in attrs.items():
        if 1 <= it <= n_items:
            m[FIRST + it - 1, :len(v)] = torch.as_tensor([col[a] for a in v])
    return m, len(ids)


# ---------------------------------------------------------------------------------------------------------------
# the run

def run(cfg: dict, data_dir: str | Path, device: str = "cpu") -> dict:
    """Train our model (best epoch by validation NDCG@10, full ranking), score the test users; also PopRec.
    Returns {"ours": {...}, "popularity": {...}, "ours_sampled99": {...}, "popularity_sampled99": {...},
    "train": {...}} with the metrics as floats."""
    import torch

    from sessionbert.realdata import _itembert as ib
    from sessionbert.realdata._itembert import hr_ndcg

    t_all = time.time()
    data = read_beauty(data_dir)
    if cfg.get("max_users"):  # smoke runs only: the first N users (the catalogue stays all items)
        data.seqs, data.users = data.seqs[:int(cfg["max_users"])], data.users[:int(cfg["max_users"])]
    seed = int(cfg.get("seed", 0))
    mc = cfg["model"]
    train = train_part(data.seqs)
    v_in, v_tg = loo_split(data.seqs, "valid")
    t_in, t_tg = loo_split(data.seqs, "test")
    n_val = int(cfg.get("val_users", 0)) or len(v_in)  # validation users scored per epoch (all by default)
    vsel = np.random.default_rng(seed).permutation(len(v_in))[:n_val]
    v_in, v_tg = [v_in[i] for i in vsel], v_tg[vsel]

    torch.manual_seed(seed)
    item_attrs, n_attrs = (attr_matrix(data.attrs, data.n_items) if mc.get("attributes", False) else (None, 0))
    model = ib.ItemBert(ib.EncoderCfg(n_items=data.n_items, hidden=mc["hidden"], layers=mc["layers"],
                                      heads=mc["heads"], max_len=mc["max_len"], dropout=mc["dropout"],
                                      emb_dropout=mc.get("emb_dropout"), n_attrs=n_attrs), item_attrs)
    metric = cfg.get("select_metric", "NDCG@10")

    def val(m) -> float:
        return hr_ndcg(model_ranks(m, v_in, v_tg, device=device)[0], KS)[metric]

    tr = cfg["train"]
    info = ib.train_next_item(model, train, epochs=tr["epochs"], batch_size=tr["batch_size"], lr=tr["lr"],
                              weight_decay=tr.get("weight_decay", 0.0), seed=seed, device=device,
                              mlm_epochs=tr.get("mlm_epochs", 0), mlm_prob=tr.get("mlm_prob", 0.2),
                              label_smoothing=tr.get("label_smoothing", 0.0), cl_weight=tr.get("cl_weight", 0.0),
                              cl_temp=tr.get("cl_temp", 1.0), evaluate=val,
                              eval_every=tr.get("eval_every", 1), patience=tr.get("patience", 0),
                              time_budget_s=tr.get("time_budget_s", 0.0), log=log.info)
    neg = sample_negatives(data.seqs, data.n_items, int(cfg.get("n_negatives", 99)), seed)
    full, samp = model_ranks(model, t_in, t_tg, neg, device=device)
    pfull, psamp = popularity_ranks(popularity(train, data.n_items), t_in, t_tg, neg)
    out = {
        "ours": hr_ndcg(full, KS),
        "popularity": hr_ndcg(pfull, KS),
        "ours_sampled99": sampled_metrics(samp),
        "popularity_sampled99": sampled_metrics(psamp),
        "train": {"best_val": info["best_val"], "select_metric": metric, "train_seconds": info["seconds"],
                  "epochs_run": sum(1 for h in info["history"] if h["stage"] == "next"),
                  "history": info["history"], "device": str(ib._device(device)),
                  "torch": torch.__version__, "total_seconds": time.time() - t_all},
        "config": cfg,
    }
    return out


def load_config(path: str | Path) -> dict:
    """The `realdata` node of conf/experiment/real_beauty.yaml (plain YAML, no Hydra needed)."""
    import yaml
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    try:
        return raw["realdata"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no realdata node") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="conf/experiment/real_beauty.yaml")
    p.add_argument("--data", default=None, help="folder with Beauty.txt (default: ../shared/data/amazon-beauty)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--set", nargs="*", default=[], help="overrides a.b=value (YAML value), keys must exist")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(a.config)
    import yaml
    for kv in a.set:
        k, v = kv.split("=", 1)
        node = cfg
        *path, last = k.split(".")
        for part in path:
            node = node[part]
        if last not in node:
            raise KeyError(f"--set {k}: unknown key")
        node[last] = yaml.safe_load(v)
    if a.data:
        data_dir = Path(a.data)
    else:
        from os import environ
        data_dir = Path(environ.get("SESSIONBERT_SHARED_DATA",
                                    Path(__file__).resolve().parents[3] / "shared" / "data")) / "amazon-beauty"
    from sessionbert.realdata._itembert import cpu_threads
    with cpu_threads(cfg.get("cpu_threads") if a.device == "cpu" else None):
        res = run(cfg, data_dir, a.device)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    log.info("ours full ranking: %s", res["ours"])
    log.info("ours 99 negatives: %s", res["ours_sampled99"])


if __name__ == "__main__":
    main()
