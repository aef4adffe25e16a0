"""Packed (padding-free) MLM pretraining: same targets, same loss and gradients as the padded path (issue 6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sessionbert.data.datasets import MLMCollator, PackedMLMCollator
from sessionbert.models.encoder import ARCHS, bert_config
from sessionbert.models.modules import MLMModule
from sessionbert.models.packed import padded_index, varlen_attention

PAD, MASK, SPECIAL, VOCAB = 0, 4, [0, 1, 2, 3, 4, 5], 97


def _items(lens, seed=0):
    g = np.random.default_rng(seed)
    return [{"idx": i, "input_ids": [2] + g.integers(6, VOCAB, n - 2).tolist() + [3]} for i, n in enumerate(lens)]


def _module(seed=0, attn_dropout=0.0, hidden_dropout=0.0, **fused):
    """Tiny MLMModule; `fused`: its fused_* knobs (fused_qkv, fused_norm, fused_gelu, fused_residual, fused_ce)."""
    torch.manual_seed(seed)
    cfg = bert_config(VOCAB, PAD, ARCHS["tiny"], max_position_embeddings=64, dropout=hidden_dropout)
    cfg.attention_probs_dropout_prob = attn_dropout
    return MLMModule(cfg.to_dict(), **fused)


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


def _grads(m) -> dict:
    return {k: p.grad for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("knobs", [{}, dict(fused_qkv=True, fused_residual=True, fused_norm=True, fused_gelu=True)])
def test_rows_run_the_last_layer_on_those_rows_only(knobs):
    """packed_hidden(rows=r), which MLMModule.packed_loss uses with the masked positions, equals packed_hidden()[r]
    in value and in every parameter's gradient (fp32, dropout off; repeated rows as the collator's filler rows are),
    and under bf16 autocast within its rounding. The last layer's work past its attention ran on len(r) rows: its
    intermediate layer saw (len(r), H), the layers below the whole stream."""
    import functools

    batch = PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3), max_len=32, multiple=64,
                              label_multiple=16)(_items([9, 30, 4, 17, 25], 1))
    rows = batch["mlm_positions"]
    assert len(rows.unique()) < len(rows)  # the filler rows repeat position 0
    g = torch.Generator().manual_seed(5)
    w = torch.randn(len(rows), ARCHS["tiny"]["hidden_size"], generator=g)  # a loss that weighs every row differently
    for amp in (False, True):
        outs, grads, seen = [], [], []
        for trim in (False, True):
            m = _module(**knobs)
            layers = m.model.bert.encoder.layer
            hooks = [lyr.intermediate.dense.register_forward_hook(
                functools.partial(lambda i, mod, inp, out: seen.append((trim, i, inp[0].shape[0])), i))
                for i, lyr in enumerate(layers)]
            args = (m.model.bert, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_len"])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # m._packed: packed_hidden with the knobs
                h = m._packed(*args, rows=rows) if trim else m._packed(*args)[rows]
            (h.float() * w).sum().backward()
            outs.append(h.float())
            grads.append(_grads(m))
            for hk in hooks:
                hk.remove()
        torch.testing.assert_close(outs[1], outs[0], **(dict(rtol=2e-2, atol=2e-2) if amp else {}))
        assert set(grads[0]) == set(grads[1])
        # per parameter, relative to its gradient's norm (plus a floor for the key biases, whose gradient is zero up
        # to rounding: softmax ignores a shift shared by all keys); bf16 rounds the repeated rows' sums elsewhere
        floor = 1e-4 * max(float(g.norm()) for g in grads[0].values())
        for name, g0 in grads[0].items():
            err = float((grads[1][name] - g0).norm())
            assert err <= (2e-2 if amp else 1e-5) * float(g0.norm()) + floor, (name, amp, err, float(g0.norm()))
        if not knobs.get("fused_residual"):  # with fused_residual the intermediate GEMM runs in branch_in, not forward
            n, last = len(batch["input_ids"]), len(layers) - 1
            assert [r for r in seen if not r[0]] == [(False, i, n) for i in range(len(layers))]
            assert [r for r in seen if r[0]] == [(True, i, n if i < last else len(rows)) for i in range(len(layers))]


def test_packed_batch_query_ranges():
    """mlm_cu_seqlens gives each session (filler sessions included) its range of the sorted masked positions."""
    batch = PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.3, seed=2), max_len=32, multiple=64,
                              label_multiple=16)(_items([9, 30, 4, 17, 25, 2], 3))
    cu, cuq, n = batch["cu_seqlens"], batch["mlm_cu_seqlens"], batch["mlm_count"]
    pos = batch["mlm_positions"][:n]
    assert cuq.dtype == torch.int32 and cuq.shape == cu.shape and int(cuq[0]) == 0 and int(cuq[-1]) == n
    assert n == int((batch["mlm_labels"] != -100).sum()) and torch.equal(pos, pos.sort().values)
    counts = []
    for i in range(len(cu) - 1):
        mine = pos[int(cuq[i]): int(cuq[i + 1])]
        assert ((mine >= cu[i]) & (mine < cu[i + 1])).all()
        counts.append(len(mine))
    assert batch["mlm_max_len"] == max(counts) > 0 and 0 in counts  # the filler session has no target


@pytest.mark.parametrize("knobs", [{}, dict(fused_qkv=True, fused_residual=True, fused_norm=True, fused_gelu=True)])
def test_query_rows_run_the_last_attention_on_the_masked_rows_only(knobs):
    """packed_hidden(rows=QueryRows(...)), what MLMModule.packed_loss passes: the last layer's attention queries only
    the masked positions; its first n rows equal packed_hidden()[masked positions] in value and in every parameter's
    gradient (fp32, dropout off; a loss over those rows, as the MLM loss is), and the filler rows after them stay
    finite. The attention ran on n queries (its output had n rows)."""
    from sessionbert.models import packed as pk
    from sessionbert.models.packed import QueryRows

    batch = PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3), max_len=32, multiple=64,
                              label_multiple=16)(_items([9, 30, 4, 17, 25], 1))
    n, rows = batch["mlm_count"], batch["mlm_positions"]
    assert n < len(rows)  # filler rows follow the masked ones
    qr = QueryRows(rows, batch["mlm_cu_seqlens"], batch["mlm_max_len"], n)
    w = torch.randn(n, ARCHS["tiny"]["hidden_size"], generator=torch.Generator().manual_seed(5))
    outs, grads, shapes = [], [], []
    orig = pk.varlen_attention
    for trim in (False, True):
        m = _module(**knobs)
        args = (m.model.bert, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_len"])
        pk.varlen_attention = lambda *a, **kw: (lambda o: shapes.append((trim, o.shape[0])) or o)(orig(*a, **kw))
        try:
            h = m._packed(*args, rows=qr) if trim else m._packed(*args)[rows]
        finally:
            pk.varlen_attention = orig
        assert torch.isfinite(h).all()
        (h[:n] * w).sum().backward()
        outs.append(h[:n].detach())
        grads.append(_grads(m))
    torch.testing.assert_close(outs[1], outs[0])
    assert set(grads[0]) == set(grads[1])
    floor = 1e-4 * max(float(g.norm()) for g in grads[0].values())  # the key biases' gradient is ~0 (see above)
    for name, g0 in grads[0].items():
        assert float((grads[1][name] - g0).norm()) <= 1e-5 * float(g0.norm()) + floor, name
    layers, stream = len(m.model.bert.encoder.layer), len(batch["input_ids"])
    assert [s for t, s in shapes if not t] == [stream] * layers
    assert [s for t, s in shapes if t] == [stream] * (layers - 1) + [n]


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_fused_residual_equals_the_plain_packed_path(fused_qkv):
    """pretrain.fused_residual (models/branch_linear.py): the residual's gradient summed in the branch GEMMs gives the
    plain packed path's loss and every gradient, with hidden dropout on (the same torch dropout draws in the same
    order), in fp32 and under bf16 autocast (the bf16 residual stream: the gradient is accumulated in place), with
    Q/K/V as one GEMM or three, and with fused GELU's bias left out of the intermediate GEMM."""
    lens = [9, 30, 4, 17, 25]
    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3)
    batch = PackedMLMCollator(mlm, max_len=32, multiple=64, label_multiple=16)(_items(lens, 1))
    for amp, fused_gelu in ((False, False), (True, False), (False, True)):
        a = _module(hidden_dropout=0.1, fused_qkv=fused_qkv, fused_gelu=fused_gelu)
        b = _module(hidden_dropout=0.1, fused_qkv=fused_qkv, fused_gelu=fused_gelu, fused_residual=True)
        losses = []
        for m in (a, b):
            torch.manual_seed(11)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                losses.append(m.packed_loss(batch))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0])
        ga, gb = _grads(a), _grads(b)
        assert set(ga) == set(gb)
        for name in ga:  # bf16: the two paths round the summed input gradients at different points
            torch.testing.assert_close(gb[name], ga[name], rtol=2e-2 if amp else 1e-5, atol=2e-3 if amp else 1e-6,
                                       msg=name)


def test_fused_residual_backward_has_no_residual_add_and_no_stack():
    """The point of pretrain.fused_residual: in backward, no (N, H) add of the two gradients of a sub-block's input
    and no stack of dq / dk / dv; their sums happen in the GEMMs (addmm_ in place). Counted with a dispatch mode
    over the backward of the plain (fused QKV) and the fused-residual packed encoders."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            self.ops.append((str(func.overloadpacket.__name__), shape))
            return out

    batch = PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3), max_len=32, multiple=64,
                              label_multiple=16)(_items([9, 30, 4, 17], 1))
    n, n_rows, h = len(batch["input_ids"]), len(batch["mlm_positions"]), ARCHS["tiny"]["hidden_size"]
    layers = ARCHS["tiny"]["num_hidden_layers"]
    seen = {}
    for fused in (False, True):
        m = _module(fused_qkv=True, fused_residual=fused)
        loss = m.packed_loss(batch)
        with Ops() as ops:
            loss.backward()
        seen[fused] = ops.ops
    shapes = ((n, h), (n_rows, h), (n, 3, 2, h // 2))  # (n_rows, h): the last layer past its attention, masked rows
    count = {f: {op: sum(1 for o, s in ops if o == op and s in shapes or o == op == "stack")
                 for op in ("add", "stack", "addmm_")} for f, ops in seen.items()}
    # plain: per layer one stack of dq / dk / dv and two residual adds (+ the embeddings' own sums); fused: none
    assert count[False]["stack"] == layers and count[False]["add"] >= 2 * layers
    assert count[True]["stack"] == 0 and count[True]["add"] == count[False]["add"] - 2 * layers
    assert count[True]["addmm_"] == 4 * layers  # Q, K, V and the intermediate layer, accumulated in place


def test_branch_in_refuses_mixed_biases_and_sums_gradients_it_cannot_take_in_place():
    """models.branch_linear.branch_in: `fuse` with some Linears biased and some not is refused; a residual gradient
    in another dtype than the GEMMs' (fp32 input under bf16 autocast) is added out of place, and the gradients
    match the plain Linears'."""
    from sessionbert.models.branch_linear import branch_in

    torch.manual_seed(0)
    lins = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False)]
    with pytest.raises(ValueError, match="every Linear with a bias or none"):
        branch_in(torch.randn(3, 8), lins, fuse=True)
    lins = [torch.nn.Linear(8, 6), torch.nn.Linear(8, 4)]
    x = torch.randn(5, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2, res = branch_in(x, lins, fuse=True)
        assert y1.dtype == torch.bfloat16 and y1.shape == (5, 6) and res.dtype == torch.float32
        loss = (y1.float() ** 2).sum() + y2.float().sum() + (res * 3).sum()
        r1, r2 = lins[0](x2), lins[1](x2)
        loss2 = (r1.float() ** 2).sum() + r2.float().sum() + (x2 * 3).sum()
    grads = torch.autograd.grad(loss, [x, *[p for lin in lins for p in lin.parameters()]])
    grads2 = torch.autograd.grad(loss2, [x2, *[p for lin in lins for p in lin.parameters()]])
    for g, g2 in zip(grads, grads2):
        assert g.dtype == g2.dtype
        torch.testing.assert_close(g, g2, rtol=2e-2, atol=2e-2)


def test_branch_in_takes_gradients_written_into_one_buffer_as_one_matrix(monkeypatch):
    """When the gradients of branch_in's outputs are adjacent column slices of one (N, sum of widths) buffer, in order
    (the fused attention kernels write dq, dk, dv so), backward runs one input-gradient and one weight-gradient GEMM
    over the concatenated weights instead of one per Linear: same gradients. Gradients that are separate tensors, out
    of order, or slices with a gap take the per-Linear path."""
    from sessionbert.models import branch_linear as bl

    torch.manual_seed(0)
    n, widths = 7, [6, 4, 6]
    buf = torch.randn(n, 16)
    slices = list(buf.split(widths, dim=1))
    joined = bl._joined(slices)
    assert joined is not None and joined.data_ptr() == buf.data_ptr() and torch.equal(joined, buf)
    assert bl._joined([s.clone() for s in slices]) is None  # separate tensors
    assert bl._joined(slices[::-1]) is None  # out of order
    assert bl._joined([slices[0], slices[2]]) is None  # a gap between them
    assert bl._joined(slices[:1]) is None and bl._joined([slices[0], None]) is None

    class Slices(torch.autograd.Function):  # identity forward; backward hands back column slices of one buffer
        @staticmethod
        def forward(ctx, *ys):
            return tuple(y.clone() for y in ys)

        @staticmethod
        def backward(ctx, *gs):
            out = torch.cat(gs, dim=1)
            return tuple(out.split([g.shape[1] for g in gs], dim=1))

    taken = []
    orig = bl._joined
    monkeypatch.setattr(bl, "_joined", lambda dys: (lambda r: taken.append(r is not None) or r)(orig(dys)))
    lins = [torch.nn.Linear(8, w) for w in widths]
    g = [torch.randn(n, w) for w in widths]
    grads = []
    for through_buffer in (True, False):
        x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        *ys, res = bl.branch_in(x, lins, fuse=True)
        ys = Slices.apply(*ys) if through_buffer else ys
        loss = sum((y * gy).sum() for y, gy in zip(ys, g)) + (res ** 2).sum()
        grads.append(torch.autograd.grad(loss, [x, *[p for lin in lins for p in lin.parameters()]]))
    assert taken == [True, False]
    ptrs = [g.untyped_storage().data_ptr() for g in grads[0][1::2]]  # the weights' gradients: one storage each
    assert len(set(ptrs)) == len(widths)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_attention_runs_only_on_half_precision_cuda_tensors():
    """pretrain.fused_attention: the Triton kernels take fp16 / bf16 CUDA tensors, as torch's varlen kernel does (fp32
    would run their dot products in TF32); anything else, here a CPU without Triton's interpreter, gets the varlen /
    padded SDPA path, which refuses the kernels' bias-gradient sums."""
    import os
    from types import SimpleNamespace

    pytest.importorskip("triton")
    from sessionbert.models.fused_attention import runs_on

    cuda = torch.device("cuda")  # a device name only: no GPU needed
    assert runs_on(SimpleNamespace(device=cuda, dtype=torch.bfloat16))
    assert runs_on(SimpleNamespace(device=cuda, dtype=torch.float16))
    assert not runs_on(SimpleNamespace(device=cuda, dtype=torch.float32))
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not runs_on(torch.zeros(1))
        q = torch.randn(6, 2, 16)
        cu = torch.tensor([0, 2, 6])
        torch.testing.assert_close(varlen_attention(q, q, q, cu, 4, fused=True), varlen_attention(q, q, q, cu, 4))
        with pytest.raises(ValueError, match="bias_grads needs the fused kernels"):
            varlen_attention(q, q, q, cu, 4, fused=True, bias_grads=tuple(torch.zeros(32) for _ in range(3)))


def test_fused_ce_without_triton_is_eager_cross_entropy():
    """pretrain.fused_ce on a CPU (no interpreter): models.fused_ce.cross_entropy is F.cross_entropy on fp32 logits,
    ignored rows left out; wrong shapes are refused. The kernels themselves: tests/test_fused_norm.py."""
    from sessionbert.models.fused_ce import cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(7, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([3, -100, 49, 0, 7, -100, 12])
    loss = cross_entropy(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().float(), labels, ignore_index=-100))
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and not logits.grad[1].any()
    with pytest.raises(ValueError, match=r"logits \(7, 50\) and labels \(6,\)"):
        cross_entropy(logits, labels[:6])


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
    saved encoder is an ordinary BertModel with attention-probability dropout 0. `pretrain.fused_norm`, `fused_gelu`,
    `fused_residual`, `fused_ce` and `fused_attention` reach the packed encoder and the loss (per layer two fused
    LayerNorm calls given their dense layer's bias, one bias + GELU, two branch_in calls, the attention with fused=True;
    one fused loss per step; on a CPU their eager maths)."""
    import json

    import sessionbert.models.packed as packed_mod
    from sessionbert.pipeline import run_pipeline

    from .conftest import make_cfg

    import sessionbert.models.modules as modules_mod

    calls, gelus, branches, losses, attention = [], [], [], [], []
    fused, dense_gelu, bias_gelu = packed_mod.dropout_add_layer_norm, packed_mod.dense_gelu, packed_mod.bias_gelu
    branch_in, fused_ce, varlen = packed_mod.branch_in, modules_mod.fused_cross_entropy, packed_mod.varlen_attention
    monkeypatch.setattr(packed_mod, "dropout_add_layer_norm",
                        lambda *a, **k: calls.append((a[3], k["a_bias"].shape)) or fused(*a, **k))
    monkeypatch.setattr(packed_mod, "dense_gelu", lambda *a: gelus.append(a[0].out_features) or dense_gelu(*a))
    monkeypatch.setattr(packed_mod, "bias_gelu", lambda *a: gelus.append(a[1].shape[0]) or bias_gelu(*a))
    monkeypatch.setattr(packed_mod, "branch_in", lambda *a, **k: branches.append(len(a[1])) or branch_in(*a, **k))
    monkeypatch.setattr(modules_mod, "fused_cross_entropy", lambda *a, **k: losses.append(1) or fused_ce(*a, **k))
    monkeypatch.setattr(packed_mod, "varlen_attention", lambda *a, **k: attention.append(k["fused"]) or varlen(*a, **k))
    on = str(fused_norm).lower()
    cfg = make_cfg(tmp_path, ["experiment=smoke", "stage=pretrain", "pretrain.packed=true", "pretrain.max_tokens=4096",
                              f"trainer.precision={precision}", f"pretrain.fused_norm={on}", f"pretrain.fused_gelu={on}",
                              f"pretrain.fused_residual={on}", f"pretrain.fused_ce={on}",
                              f"pretrain.fused_attention={on}"])
    metrics = run_pipeline(cfg)
    arch = ARCHS[cfg.model.arch]
    layers = arch["num_hidden_layers"]
    assert (len(calls) > 0) == fused_norm and len(calls) % (2 * layers) == 0 and len(gelus) == len(calls) // 2
    assert fused_norm is False or 0.0 < max(p for p, _ in calls) < 1  # hidden dropout while training, 0 in validation
    assert {shape for _, shape in calls} <= {(arch["hidden_size"],)}
    assert set(gelus) <= {arch["intermediate_size"]}
    assert len(branches) == len(calls) and sorted(set(branches)) == ([1, 3] if fused_norm else [])  # Q/K/V; intermediate
    # one fused loss per packed step (4 LayerNorm calls), and on the padded validation batches too
    assert (len(losses) > 0) == fused_norm and len(losses) >= len(calls) // (2 * layers)
    assert len(attention) > 0 and set(attention) == {fused_norm}  # pretrain.fused_attention reaches every layer
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
    import json

    from .conftest import experiment_module

    mod = experiment_module("bench_attention")
    out = tmp_path / "att.json"
    rows = mod.main(["--device", "cpu", "--tokens", "1500", "--repeats", "1", "--warmup", "1", "--buckets", "3",
                     "--variants", "varlen,sdpa-efficient,sdpa-math", "--out", str(out)])
    by = {r["variant"]: r for r in rows}
    assert by["varlen"]["max_abs_diff_vs_first"] == 0.0 and by["sdpa-math"]["max_abs_diff_vs_first"] < 1e-4
    assert "error" in by["sdpa-efficient"] and "fwd_ms" not in by["sdpa-efficient"]  # no CPU kernel: said
    assert by["sdpa-math"]["tokens"] >= 1500 and by["sdpa-math"]["fwd_bwd_ms"] > 0
    assert [json.loads(x)["variant"] for x in out.read_text().splitlines()] == ["varlen", "sdpa-efficient", "sdpa-math"]
