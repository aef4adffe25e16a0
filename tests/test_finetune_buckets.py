"""Length-bucketed fine-tuning (finetune.max_tokens, the GPU path): token-budget train batches covering every
prefix once per epoch, the work counted (real tokens vs padded slots), bucketed val/test giving the metrics of
fixed batches, and SessionEncoder.lengths equal to len(build(...))."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from sessionbert.data.serialize import SessionEncoder
from sessionbert.pipeline import Run, finetune_data, finetune_loaders, load_finetuned, run_pipeline

from .conftest import make_cfg

BUDGET, MULT = 1024, 8  # smoke: seq_len 64, batch_size 32 (fixed batches up to 2048 slots)
SMALL = ["experiment=smoke", "+data.overrides.n_users=100", "finetune.train_prefixes_per_session=1",
         "finetune.eval_prefixes_per_session=1"]
BUCKETED = [*SMALL, "stage=finetune", f"finetune.max_tokens={BUDGET}", f"finetune.pad_to_multiple_of={MULT}"]


def test_lengths_and_build_many_equal_build_with_truncation():
    from sessionbert.data.corpus import Corpus
    from sessionbert.data.tokenizer import train_wordpiece

    from .test_units import toy_events

    c = Corpus.build(toy_events(20), None, 14, 28)
    tok, _ = train_wordpiece(c.train_texts(), 400)
    n_ev = c.sessions["n_events"].to_numpy()
    items = np.array([(s, n) for s in range(len(n_ev)) for n in [-1, *range(0, n_ev[s] + 1)]])
    for seq_len in (3, 4, 6, 12, 24, 64, 512):  # metadata cut, single events over budget, no truncation
        enc_obj = SessionEncoder(tok, seq_len)
        enc = c.encode(enc_obj)
        want = np.array([len(enc_obj.build(enc, int(s), None if n < 0 else int(n))) for s, n in items])
        assert np.array_equal(enc_obj.lengths(enc, items), want), seq_len
        assert want.max() <= max(seq_len, 2)
        ids, offsets = enc_obj.build_many(enc, items, chunk=97)  # chunks that cut the rows anywhere
        assert np.array_equal(np.diff(offsets), want), seq_len
        for i, (s, n) in enumerate(items):
            assert ids[offsets[i]:offsets[i + 1]].tolist() == enc_obj.build(enc, int(s), None if n < 0 else int(n)), \
                (seq_len, s, n)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftbuckets")
    cfg = make_cfg(tmp, BUCKETED)
    m = run_pipeline(cfg)
    run = Run(cfg)
    run.stage_dirs = {k: Path(v) for k, v in m["stage_dirs"].items()}
    module, tok, labels = load_finetuned(run.stage_dirs["finetune"])
    sets = finetune_data(run, tok, labels)
    return tmp, cfg, m, module, tok, sets


def _epoch(dl):
    """(idx of every example, per-batch (B, T, real tokens, counted real, counted slots)) of one pass."""
    idx, shapes = [], []
    for b in dl:
        ids = b["input_ids"]
        idx.extend(b["idx"].tolist())
        shapes.append((ids.shape[0], ids.shape[1], int(b["attention_mask"].sum()), b.get("real_tokens"),
                       b.get("padded_slots")))
    return np.array(idx), shapes


def test_train_batches_within_budget_each_example_once_per_epoch(bucketed):
    tmp, cfg, m, module, tok, sets = bucketed
    n = len(sets["train"])
    lo = finetune_loaders(cfg, sets, tok.pad_token_id)
    assert type(lo["sampler"]).__name__ == "TokenBudgetBatchSampler"
    lens = np.array([len(sets["train"][i]["input_ids"]) for i in range(n)])
    assert np.array_equal(lo["lengths"]["train"], lens)
    orders = []
    for epoch in (0, 1):
        lo["sampler"].set_epoch(epoch)
        idx, shapes = _epoch(lo["train"])
        assert np.array_equal(np.sort(idx), np.arange(n)), "every training prefix exactly once per epoch"
        for B, T, real, counted, slots in shapes:
            assert B * T <= BUDGET and T % MULT == 0
            assert counted == real and slots == B * T  # the counting collator's numbers
        orders.append(idx)
        bucketed_slots = sum(B * T for B, T, *_ in shapes)
    assert not np.array_equal(orders[0], orders[1]), "reshuffled per epoch"
    assert len(shapes) > -(-n // cfg.finetune.batch_size), "smaller batches than the fixed ones: budget binds"
    # bucketing pays: fewer padded slots than the fixed batches of finetune.batch_size over the same prefixes
    fixed = finetune_loaders(make_cfg(tmp, SMALL), sets, tok.pad_token_id)
    assert type(fixed["sampler"]).__name__ == "SeededBatchSampler"
    _, fshapes = _epoch(fixed["train"])
    assert bucketed_slots < sum(B * T for B, T, *_ in fshapes)
    # val / test: every example once, within the budget, shortest first
    for w in ("val", "test"):
        idx, shapes = _epoch(lo[w])
        assert np.array_equal(np.sort(idx), np.arange(len(sets[w]))) and len(idx) == len(sets[w])
        assert all(B * T <= BUDGET for B, T, *_ in shapes)
        assert [T for _, T, *_ in shapes] == sorted(T for _, T, *_ in shapes)


def test_bucketed_pipeline_end_to_end_counts_the_work(bucketed):
    tmp, cfg, m, module, tok, sets = bucketed
    ft = m["finetune"]
    for head in ("page", "service"):
        for name in ("f1_micro", "f1_macro", "f1_weighted", "hit@5"):
            assert math.isfinite(ft[f"{head}_{name}"]) and 0 <= ft[f"{head}_{name}"] <= 1
    assert ft["batching"] == "token_budget" and ft["max_batch_slots"] <= BUDGET
    # one epoch: the counted real tokens are exactly those of every training prefix once
    lens = np.array([len(sets["train"][i]["input_ids"]) for i in range(len(sets["train"]))])
    assert ft["real_tokens"] == int(lens.sum())
    assert ft["real_tokens"] <= ft["padded_slots"] and ft["pad_fraction"] < 0.25
    assert ft["train_batches"] == len(finetune_loaders(cfg, sets, tok.pad_token_id)["sampler"])
    assert ft["real_tokens_per_s"] > 0


def test_bucketed_eval_same_metrics_as_fixed_batches(bucketed):
    tmp, cfg, m, module, tok, sets = bucketed
    fixed_cfg = make_cfg(tmp, [*SMALL, "runtime.eval_batch_size=64"])
    res = {}
    for name, c in (("bucketed", cfg), ("fixed", fixed_cfg)):
        dl = finetune_loaders(c, sets, tok.pad_token_id)["test"]
        res[name] = (len(dl), L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                        enable_model_summary=False).test(module, dl, verbose=False)[0])
    assert res["bucketed"][0] != res["fixed"][0], "the two loaders really batch differently"
    b, f = res["bucketed"][1], res["fixed"][1]
    keys = [k for k in b if "f1" in k or "hit@5" in k]
    assert len(keys) == 8
    for k in keys:
        assert b[k] == f[k], k  # counts accumulated over batches: the batching cannot change them
        head, name = k.removeprefix("finetune/test_").split("_", 1)
        assert b[k] == pytest.approx(m["finetune"][f"{head}_{name}"], abs=1e-6)  # what the stage recorded
    assert b["finetune/test_loss"] == pytest.approx(f["finetune/test_loss"], rel=1e-4)


def test_config_gpu_trainers_bucket_finetuning_and_bad_budget_is_refused(tmp_path):
    from sessionbert.config import ConfigError, validate

    assert make_cfg(tmp_path).finetune.max_tokens is None  # CPU default: fixed batches
    for trainer in ("gpu", "ddp"):
        c = make_cfg(tmp_path, [f"trainer={trainer}"])
        assert (c.finetune.max_tokens, c.finetune.pad_to_multiple_of) == (16384, 32)
    assert make_cfg(tmp_path, ["trainer=gpu", "finetune.max_tokens=null"]).finetune.max_tokens is None
    for bad in ("finetune.max_tokens=0", "finetune.pad_to_multiple_of=-8"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            validate(make_cfg(tmp_path, [bad]))
