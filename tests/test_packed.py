"""Packed (padding-free) MLM pretraining: same targets, same loss and gradients as the padded path (issue 6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sessionbert.data.datasets import MLMCollator, PackedMLMCollator
from sessionbert.models.encoder import ARCHS, bert_config
from sessionbert.models.modules import MLMModule
from sessionbert.models.packed import padded_index, varlen_attention

PAD, MASK, SPECIAL, VOCAB = 0, 4, [0, 1, 2, 3, 4, 5], 97


def _items(lens, seed=0):
    g = np.random.default_rng(seed)
    return [{"idx": i, "input_ids": [2] + g.integers(6, VOCAB, n - 2).tolist() + [3]} for i, n in enumerate(lens)]


def _module(seed=0, attn_dropout=0.0, hidden_dropout=0.0, fused_qkv=False, fused_norm=False, fused_gelu=False):
    torch.manual_seed(seed)
    cfg = bert_config(VOCAB, PAD, ARCHS["tiny"], max_position_embeddings=64, dropout=hidden_dropout)
    cfg.attention_probs_dropout_prob = attn_dropout
    return MLMModule(cfg.to_dict(), fused_qkv=fused_qkv, fused_norm=fused_norm, fused_gelu=fused_gelu)


def test_padded_index_roundtrip():
    cu = torch.tensor([0, 3, 3, 7, 8])
    x = torch.arange(8.0)
    idx, valid = padded_index(cu, 5)
    assert valid.sum(1).tolist() == [3, 0, 4, 1]
    assert torch.equal(x[idx][valid], x)


def test_varlen_attention_is_per_session_attention():
    """Against SDPA run on each session alone: a position never sees another session's tokens."""
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 9, 3]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]))
    q, k, v = (torch.randn(sum(lens), 2, 8, generator=g) for _ in range(3))
    out = varlen_attention(q, k, v, cu, max(lens))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)))
        torch.testing.assert_close(out[s:e], ref.transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_packed_batch_layout():
    lens = [7, 3, 12, 5]
    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.3, seed=1)
    padded = mlm(_items(lens))
    b = PackedMLMCollator(mlm, max_len=16, multiple=8, label_multiple=4)(_items(lens))
    assert b["real_tokens"] == sum(lens) and b["padded_slots"] == 32 and len(b["input_ids"]) == 32
    seg = (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).tolist()
    assert seg[:4] == lens and sum(seg) == 32 and max(seg) <= 16
    valid = padded["attention_mask"].bool()
    assert torch.equal(b["input_ids"][: sum(lens)], padded["input_ids"][valid])
    # positions restart at 0 in every session (filler included)
    assert b["position_ids"].tolist()[:7] == list(range(7)) and b["position_ids"][7].item() == 0
    # the targets are exactly the padded batch's targets, in stream order; filler labels are ignored
    m = int((padded["labels"] != -100).sum())
    assert m > 0 and len(b["mlm_labels"]) % 4 == 0
    assert torch.equal(b["mlm_labels"][:m], padded["labels"][padded["labels"] != -100])
    assert (b["mlm_labels"][m:] == -100).all()
    assert torch.equal(b["input_ids"][b["mlm_positions"][:m]], padded["input_ids"][padded["labels"] != -100])


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_packed_loss_and_grads_equal_padded(fused_qkv):
    """Same weights, same masks: the packed loss and every gradient equal the padded path's (dropout off), with the
    Q, K, V projections as three GEMMs or one (pretrain.fused_qkv: the grads still reach the three Linears)."""
    lens = [9, 30, 4, 17, 17, 2 + 1, 25]
    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3)
    padded = mlm(_items(lens, 1))
    packed = PackedMLMCollator(mlm, max_len=32, multiple=64, label_multiple=16)(_items(lens, 1))
    a, b = _module(), _module(fused_qkv=fused_qkv)
    la = a(padded["input_ids"], padded["attention_mask"], padded["labels"])
    lb = b.packed_loss(packed)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    ga, gb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, p in ga.items():
        if p.grad is None:
            assert gb[name].grad is None or not gb[name].grad.any(), name
            continue
        torch.testing.assert_close(gb[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_training_follows_the_padded_loss_curve():
    """A few optimizer steps on each path from the same init and batches: the loss curves agree."""
    lens_batches = [[12, 20, 7, 31], [5, 9, 28], [16, 16, 16, 3, 22]]
    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.2, seed=5)
    pack = PackedMLMCollator(mlm, max_len=32, multiple=32, label_multiple=8)
    curves = {}
    for kind in ("padded", "packed"):
        m = _module(seed=7)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for epoch in range(6):
            for j, lens in enumerate(lens_batches):
                items = _items(lens, seed=j)  # the same batches every epoch: it can learn them
                if kind == "padded":
                    b = mlm(items)
                    loss = m(b["input_ids"], b["attention_mask"], b["labels"])
                else:
                    loss = m.packed_loss(pack(items))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        curves[kind] = losses
    assert curves["padded"][0] > curves["padded"][-1]  # it learns
    np.testing.assert_allclose(curves["packed"], curves["padded"], rtol=1e-3)


def test_packed_refuses_attention_dropout_in_training():
    m = _module(attn_dropout=0.1)
    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.3)
    b = PackedMLMCollator(mlm, max_len=32, multiple=8)(_items([5, 6]))
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        m.packed_loss(b)
    m.eval()
    assert torch.isfinite(m.packed_loss(b))


def test_packed_collator_rejects_long_sessions_and_padded_inner():
    with pytest.raises(ValueError, match="must not pad"):
        PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, pad_to_multiple_of=8), max_len=16)
    with pytest.raises(ValueError, match="exceeds max_len 8"):
        PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL), max_len=8)(_items([9]))


def test_packed_under_bf16_autocast_stays_close_to_padded():
    """Under autocast the packed residual stream is bf16 (LayerNorm on bf16 input, fp32 weights): the loss stays
    within bf16 rounding of the padded path's."""
    lens = [9, 30, 4, 17, 25]
    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3)
    padded, packed = mlm(_items(lens, 2)), PackedMLMCollator(mlm, max_len=32, multiple=64)(_items(lens, 2))
    m = _module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = m._packed(m.model.bert, packed["input_ids"], packed["position_ids"], packed["cu_seqlens"], 32)
        assert hidden.dtype == torch.bfloat16
        lb = m.packed_loss(packed).float()
        la = m(padded["input_ids"], padded["attention_mask"], padded["labels"]).float()
    assert abs(lb.item() - la.item()) / la.item() < 2e-2


@pytest.mark.parametrize("precision,fused_norm", [("32-true", False), ("bf16-mixed", True)])
def test_pipeline_pretrains_packed(tmp_path, monkeypatch, precision, fused_norm):
    """`pretrain.packed=true` through the pipeline and Lightning (CPU: the padded-SDPA fallback of the varlen
    attention; bf16-mixed: the bf16 residual stream under Lightning's autocast, as on a GPU): it trains, and the
    saved encoder is an ordinary BertModel with attention-probability dropout 0. `pretrain.fused_norm=true` and
    `pretrain.fused_gelu=true` reach the packed encoder (two fused LayerNorm calls and one bias + GELU per layer, the
    LayerNorms given their dense layer's bias; on a CPU their eager maths)."""
    import json

    import sessionbert.models.packed as packed_mod
    from sessionbert.pipeline import run_pipeline

    from .conftest import make_cfg

    calls, gelus = [], []
    fused, fused_gelu = packed_mod.dropout_add_layer_norm, packed_mod.dense_gelu
    monkeypatch.setattr(packed_mod, "dropout_add_layer_norm",
                        lambda *a, **k: calls.append((a[3], k["a_bias"].shape)) or fused(*a, **k))
    monkeypatch.setattr(packed_mod, "dense_gelu", lambda *a: gelus.append(a[0].out_features) or fused_gelu(*a))
    cfg = make_cfg(tmp_path, ["experiment=smoke", "stage=pretrain", "pretrain.packed=true", "pretrain.max_tokens=4096",
                              f"trainer.precision={precision}", f"pretrain.fused_norm={str(fused_norm).lower()}",
                              f"pretrain.fused_gelu={str(fused_norm).lower()}"])
    metrics = run_pipeline(cfg)
    arch = ARCHS[cfg.model.arch]
    layers = arch["num_hidden_layers"]
    assert (len(calls) > 0) == fused_norm and len(calls) % (2 * layers) == 0 and len(gelus) == len(calls) // 2
    assert fused_norm is False or 0.0 < max(p for p, _ in calls) < 1  # hidden dropout while training, 0 in validation
    assert {shape for _, shape in calls} <= {(arch["hidden_size"],)}
    assert set(gelus) <= {arch["intermediate_size"]}
    pre = metrics["pretrain"]
    assert np.isfinite(pre["mlm_loss"]) and pre["mlm_loss"] < 20
    enc = next((tmp_path / "cache" / "pretrain").glob("*/encoder/config.json"))
    assert json.loads(enc.read_text())["attention_probs_dropout_prob"] == 0.0


def test_packed_needs_max_tokens(tmp_path):
    from sessionbert.config import ConfigError, validate

    from .conftest import make_cfg

    with pytest.raises(ConfigError, match="pretrain.packed: needs pretrain.max_tokens"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.packed=true"]))
    with pytest.raises(ConfigError, match="pretrain.compile: true or false"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.compile=3"]))


def test_bench_attention_variants_agree_and_refusals_are_reported(tmp_path):
    """experiments/bench_attention.py (the attention kernels for the packed step): on a CPU the varlen path's fallback
    and padded length buckets through SDPA's math kernel give the same attention; a kernel that refuses the input
    is reported with its error, and the next variant still runs."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "att.json"
    rows = mod.main(["--device", "cpu", "--tokens", "1500", "--repeats", "1", "--warmup", "1", "--buckets", "3",
                     "--variants", "varlen,sdpa-efficient,sdpa-math", "--out", str(out)])
    by = {r["variant"]: r for r in rows}
    assert by["varlen"]["max_abs_diff_vs_first"] == 0.0 and by["sdpa-math"]["max_abs_diff_vs_first"] < 1e-4
    assert "error" in by["sdpa-efficient"] and "fwd_ms" not in by["sdpa-efficient"]  # no CPU kernel: said
    assert by["sdpa-math"]["tokens"] >= 1500 and by["sdpa-math"]["fwd_bwd_ms"] > 0
    assert [json.loads(x)["variant"] for x in out.read_text().splitlines()] == ["varlen", "sdpa-efficient", "sdpa-math"]
