"""The packed encoder's Triton kernels: dropout + add + LayerNorm with the dense bias (`pretrain.fused_norm`,
sessionbert/models/fused_norm.py), bias + GELU (`pretrain.fused_gelu`, sessionbert/models/fused_gelu.py) and the MLM
cross-entropy (`pretrain.fused_ce`, sessionbert/models/fused_ce.py).

The Triton kernels themselves run here through Triton's interpreter (TRITON_INTERPRET=1, numpy on the CPU), in a
subprocess because the interpreter is chosen when the kernels are defined. On a GPU the same kernels are checked
against the eager path at BERT-base size by experiments/device/fused_norm_check.py
(results/fused_norm_check_gpu.json)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sessionbert.models.encoder import ARCHS
from sessionbert.models.fused_gelu import bias_gelu
from sessionbert.models.fused_norm import available, dropout_add_layer_norm

ROOT = Path(__file__).resolve().parents[1]


def _eager(a, x, norm, p=0.0):
    return norm(F.dropout(a, p, training=p > 0) + x)


def test_without_triton_kernels_the_eager_maths_runs():
    """On a CPU (no interpreter) the function is LayerNorm(dropout(a) + x) in eager PyTorch, gradients included."""
    assert not available("cpu") or os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(24)
    torch.nn.init.normal_(norm.weight)
    a, x = torch.randn(10, 24, requires_grad=True), torch.randn(10, 24, requires_grad=True)
    y = dropout_add_layer_norm(a, x, norm, 0.0)
    torch.testing.assert_close(y, _eager(a, x, norm))
    y.sum().backward()
    assert a.grad is not None and x.grad is not None and norm.weight.grad is not None


def test_bad_arguments_are_refused():
    norm = torch.nn.LayerNorm(8)
    with pytest.raises(ValueError, match="dropout probability must be in"):
        dropout_add_layer_norm(torch.zeros(2, 8), torch.zeros(2, 8), norm, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        dropout_add_layer_norm(torch.zeros(2, 8), torch.zeros(3, 8), norm, 0.1)
    with pytest.raises(ValueError, match="shapes"):
        dropout_add_layer_norm(torch.zeros(2, 6), torch.zeros(2, 6), norm, 0.1)
    with pytest.raises(ValueError, match=r"bias \(7,\)"):
        dropout_add_layer_norm(torch.zeros(2, 8), torch.zeros(2, 8), norm, 0.1, a_bias=torch.zeros(7))
    with pytest.raises(ValueError, match="bias_gelu: bias of shape"):
        bias_gelu(torch.zeros(2, 8), torch.zeros(6))


def test_attention_backward_blocks_shrink_to_the_longest_session():
    """Keys per attention-backward program: 128, or the length bucket (>= 32) when every session is shorter."""
    from sessionbert.models.fused_attention import _bwd_block_n
    assert [_bwd_block_n(n) for n in (1, 20, 32, 33, 64, 65, 128, 129, 512)] == [32, 32, 32, 64, 64, 128, 128, 128,
                                                                                  128]


def test_without_triton_the_bias_gelu_is_eager_gelu():
    """On a CPU (no interpreter) bias_gelu is gelu(y + bias) in eager PyTorch, gradients included."""
    torch.manual_seed(0)
    y, b = torch.randn(6, 40, requires_grad=True), torch.randn(40, requires_grad=True)
    out = bias_gelu(y, b)
    torch.testing.assert_close(out, F.gelu(y + b))
    out.sum().backward()
    assert y.grad is not None and b.grad is not None


def test_fused_gelu_needs_exact_gelu():
    """packed_hidden(fused_gelu=True) refuses a model whose hidden_act is not BERT's exact GELU, and MLMModule does
    so when it is built, before any compute."""
    from sessionbert.models.packed import packed_hidden

    from .test_packed import _module

    m = _module()
    m.model.bert.config.hidden_act = "gelu_new"
    with pytest.raises(ValueError, match="fused_gelu computes exact GELU"):
        packed_hidden(m.model.bert, torch.zeros(4, dtype=torch.long), torch.arange(4), torch.tensor([0, 4]), 4,
                      fused_gelu=True)
    from sessionbert.models.modules import MLMModule

    with pytest.raises(ValueError, match="MLMModule: fused_gelu computes exact GELU.*'gelu_new'"):  # at construction
        MLMModule(m.model.bert.config.to_dict(), fused_gelu=True)


@pytest.mark.parametrize("fused_gelu", [False, True])
def test_packed_encoder_with_fused_norm_equals_the_unfused_path(fused_gelu):
    """packed_hidden(fused_norm=True), with and without fused_gelu, gives the same loss and gradients as the unfused
    path (dropout off), in fp32 and under bf16 autocast (the bf16 residual stream), here with the eager maths the
    fused functions fall back to on a CPU."""
    from sessionbert.data.datasets import MLMCollator, PackedMLMCollator

    from .test_packed import MASK, PAD, SPECIAL, VOCAB, _items, _module

    mlm = MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3)
    batch = PackedMLMCollator(mlm, max_len=32, multiple=64, label_multiple=16)(_items([9, 30, 4, 17, 25], 1))
    for amp in (False, True):
        a, b = _module(), _module(fused_norm=True, fused_gelu=fused_gelu)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            la, lb = a.packed_loss(batch), b.packed_loss(batch)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la)
        gb = dict(b.named_parameters())
        for name, p in a.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(gb[name].grad, p.grad, msg=name)


def test_fused_norm_knob_is_validated(tmp_path):
    from sessionbert.config import ConfigError, validate

    from .conftest import make_cfg

    with pytest.raises(ConfigError, match="pretrain.fused_norm: true or false"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.fused_norm=yes"]))
    with pytest.raises(ConfigError, match="pretrain.fused_gelu: true or false"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.fused_gelu=1"]))
    with pytest.raises(ConfigError, match="pretrain.fused_residual: true or false"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.fused_residual=on"]))
    with pytest.raises(ConfigError, match="pretrain.fused_ce: true or false"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.fused_ce=0"]))
    with pytest.raises(ConfigError, match="pretrain.fused_attention: true or false"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.fused_attention=flash"]))
    validate(make_cfg(tmp_path, ["experiment=smoke", "pretrain.packed=true", "pretrain.max_tokens=512",
                                 "pretrain.fused_norm=true"]))


def interpreted(script: str) -> dict:
    """The JSON that `script` prints after "RESULT ", run in a subprocess under Triton's interpreter (skipped without
    Triton)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


_KERNEL_CHECKS = r"""
import itertools, json, sys
import torch
import torch.nn.functional as F
from sessionbert.models import fused_norm as fn

assert fn.available("cpu"), "the interpreter should make the kernels available on a CPU"
out = {}


def eager(a, x, norm, keep=None, p=0.0):
    a = a if keep is None else a * keep / (1 - p)
    return F.layer_norm(a + x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


torch.manual_seed(0)
for n, h in ((70, 48), (5, 20)):  # 70 rows: three backward programs of 32, the last one short; 48 / 20 columns masked
    norm = torch.nn.LayerNorm(h)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    ref = torch.nn.LayerNorm(h)
    ref.load_state_dict(norm.state_dict())
    a, x = torch.randn(n, h, requires_grad=True), torch.randn(n, h, requires_grad=True)
    a2, x2 = a.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    g = torch.randn(n, h)
    y = fn.dropout_add_layer_norm(a, x, norm, 0.0)
    y.backward(g)
    y2 = eager(a2, x2, ref)
    y2.backward(g)
    for name, u, v in (("y", y, y2), ("da", a.grad, a2.grad), ("dx", x.grad, x2.grad),
                       ("dweight", norm.weight.grad, ref.weight.grad), ("dbias", norm.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=f"{name} at {n}x{h}")
    out[f"p0_{n}x{h}"] = "equal"

# dropout: the mask the backward applies is the forward's (y recomputed from it), rate about p, scaled by 1/(1-p)
p, n, h = 0.3, 96, 40
norm = torch.nn.LayerNorm(h)
a, x = torch.randn(n, h, requires_grad=True), torch.randn(n, h, requires_grad=True)
torch.manual_seed(11)
y = fn.dropout_add_layer_norm(a, x, norm, p)
y.backward(torch.randn(n, h))
keep = (a.grad != 0).float()
torch.testing.assert_close(y, eager(a.detach(), x.detach(), norm, keep, p), rtol=1e-4, atol=1e-5)
torch.testing.assert_close(a.grad, x.grad * keep / (1 - p), rtol=1e-4, atol=1e-6)
out["drop_share"] = 1 - float(keep.mean())
torch.manual_seed(11)
same = fn.dropout_add_layer_norm(a.detach(), x.detach(), norm, p)
torch.manual_seed(12)
other = fn.dropout_add_layer_norm(a.detach(), x.detach(), norm, p)
out["same_seed_equal"] = bool(torch.equal(same, y.detach()))
out["other_seed_differs"] = not bool(torch.equal(other, y.detach()))

# bf16 activations with fp32 LayerNorm weights (the packed encoder under autocast): gradients in the inputs' dtypes
norm = torch.nn.LayerNorm(32)
a = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
x = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
y = fn.dropout_add_layer_norm(a, x, norm, 0.0)
y.float().sum().backward()
ref = F.layer_norm((a.detach() + x.detach()).float(), (32,), norm.weight.detach(), norm.bias.detach())
out["bf16_dtypes"] = [str(t.dtype) for t in (y, a.grad, x.grad, norm.weight.grad)]
out["bf16_max_err"] = float((y.float() - ref).abs().max())

# the dense layer's bias folded in: its gradient is the column sum of the dropped-out input gradient
for p in (0.0, 0.3):
    n, h = 70, 48
    norm = torch.nn.LayerNorm(h)
    torch.nn.init.normal_(norm.weight)
    a, x = torch.randn(n, h, requires_grad=True), torch.randn(n, h, requires_grad=True)
    ab = torch.randn(h, requires_grad=True)
    torch.manual_seed(5)
    y = fn.dropout_add_layer_norm(a, x, norm, p, a_bias=ab)
    g = torch.randn(n, h)
    y.backward(g)
    keep = (a.grad != 0).float() if p else None
    a2, x2, ab2 = (t.detach().clone().requires_grad_() for t in (a, x, ab))
    w2, b2 = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    u = a2 + ab2 if keep is None else (a2 + ab2) * keep / (1 - p)
    y2 = F.layer_norm(u + x2, (h,), w2, b2, norm.eps)
    y2.backward(g)
    for name, u_, v in (("y", y, y2), ("da", a.grad, a2.grad), ("dx", x.grad, x2.grad), ("dbias_dense", ab.grad, ab2.grad),
                        ("dweight", norm.weight.grad, w2.grad), ("dbias", norm.bias.grad, b2.grad)):
        torch.testing.assert_close(u_, v, rtol=1e-4, atol=1e-4, msg=f"{name} with the dense bias, p={p}")
    out[f"dense_bias_p{p}"] = "equal"

# every tile shape the autotuner may pick (it tries only the first under the interpreter): the kernels launched
# directly, each against the eager gradients, 70 rows (a short last program for every ROWS), dropout on
n, h, p, seed = 70, 48, 0.2, 1234
norm = torch.nn.LayerNorm(h)
torch.nn.init.normal_(norm.weight)
torch.nn.init.normal_(norm.bias)
a, x, ab, dy = torch.randn(n, h), torch.randn(n, h), torch.randn(h), torch.randn(n, h)
tiles = []
for rb in (1, 2, 4, 8):
    z, y, mean, rstd = torch.empty(n, h), torch.empty(n, h), torch.empty(n), torch.empty(n)
    fn._fwd_kernel.fn[(-(-n // rb),)](a, ab, x, norm.weight, norm.bias, z, y, mean, rstd, n, h, norm.eps, p, seed,
                                      BLOCK=fn._block(h), RB=rb, DROPOUT=True, HAS_AB=True, ROWS=rb, PREFETCH=False)
    for rows, prefetch in ((16, True), (32, False), (32, True)):  # loops of several tiles: the same numbers
        outs = [torch.empty_like(t) for t in (z, y, mean, rstd)]
        fn._fwd_kernel.fn[(-(-n // rows),)](a, ab, x, norm.weight, norm.bias, *outs, n, h, norm.eps, p, seed,
                                            BLOCK=fn._block(h), RB=rb, DROPOUT=True, HAS_AB=True, ROWS=rows,
                                            PREFETCH=prefetch)
        assert all(torch.equal(u_, v) for u_, v in zip(outs, (z, y, mean, rstd))), f"fwd RB={rb} ROWS={rows}"
    keep = ((z - x).abs() > 1e-6).float()  # z = dropout(a + ab) + x
    torch.testing.assert_close(z, (a + ab) * keep / (1 - p) + x, rtol=1e-5, atol=1e-5, msg=f"fwd z RB={rb}")
    torch.testing.assert_close(y, F.layer_norm(z, (h,), norm.weight, norm.bias, norm.eps), rtol=1e-4, atol=1e-4,
                               msg=f"fwd y RB={rb}")
    zr = z.clone().requires_grad_()
    wr, br = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    F.layer_norm(zr, (h,), wr, br, norm.eps).backward(dy)
    for rows, prefetch in itertools.product((16, 32), (False, True)):
        progs = -(-n // rows)
        dx, da, parts = torch.empty(n, h), torch.empty(n, h), torch.empty(3, progs, h)
        fn._bwd_kernel.fn[(progs,)](dy, z, norm.weight, mean, rstd, dx, da, parts[0], parts[1], parts[2], n, h, p, seed,
                                    BLOCK=fn._block(h), RB=rb, ROWS=rows, DROPOUT=True, HAS_AB=True, PREFETCH=prefetch)
        sums = parts.sum(1)
        for name, u_, v in (("dx", dx, zr.grad), ("da", da, zr.grad * keep / (1 - p)), ("dweight", sums[0], wr.grad),
                            ("dbias", sums[1], br.grad), ("dbias_dense", sums[2], (zr.grad * keep / (1 - p)).sum(0))):
            torch.testing.assert_close(u_, v, rtol=1e-4, atol=1e-4, msg=f"{name} RB={rb} ROWS={rows} {prefetch}")
        tiles.append([rb, rows, prefetch])
out["ln_tiles"] = tiles

# bias + GELU (fused_gelu): values and gradients against eager; 1500 columns = two column blocks, the second short
from sessionbert.models import fused_gelu as fg
for n, c in ((70, 48), (9, 1500)):
    y, b = torch.randn(n, c, requires_grad=True), torch.randn(c, requires_grad=True)
    y2, b2 = y.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    g = torch.randn(n, c)
    o = fg.bias_gelu(y, b)
    o.backward(g)
    F.gelu(y2 + b2).backward(g)
    for name, u_, v in (("out", o, F.gelu(y2 + b2)), ("dy", y.grad, y2.grad), ("dbias", b.grad, b2.grad)):
        torch.testing.assert_close(u_, v, rtol=1e-4, atol=1e-4, msg=f"gelu {name} at {n}x{c}")
    out[f"gelu_{n}x{c}"] = "equal"
n, c = 70, 1500
y, b, do = torch.randn(n, c), torch.randn(c), torch.randn(n, c)
yr, br = y.clone().requires_grad_(), b.clone().requires_grad_()
ref = F.gelu(yr + br)
ref.backward(do)
tiles = []
for rb in (2, 4, 8):
    o = torch.empty(n, c)
    fg._fwd_kernel.fn[(-(-n // rb), 2)](y, b, o, n, c, RB=rb, BC=fg._bc(c), ROWS=rb, PREFETCH=False)
    torch.testing.assert_close(o, ref.detach(), rtol=1e-4, atol=1e-4, msg=f"gelu fwd RB={rb}")
    for rows, prefetch in ((16, True), (32, False), (32, True)):  # loops of several tiles: the same numbers
        o2 = torch.empty(n, c)
        fg._fwd_kernel.fn[(-(-n // rows), 2)](y, b, o2, n, c, RB=rb, BC=fg._bc(c), ROWS=rows, PREFETCH=prefetch)
        assert torch.equal(o2, o), f"gelu fwd RB={rb} ROWS={rows} PREFETCH={prefetch}"
    for rows, prefetch in itertools.product((32, 64), (False, True)):
        progs = -(-n // rows)
        dy, parts = torch.empty(n, c), torch.empty(progs, c)
        fg._bwd_kernel.fn[(progs, 2)](do, y, b, dy, parts, n, c, RB=rb, ROWS=rows, BC=fg._bc(c), PREFETCH=prefetch)
        msg = f"RB={rb} ROWS={rows} PREFETCH={prefetch}"
        torch.testing.assert_close(dy, yr.grad, rtol=1e-4, atol=1e-4, msg=f"gelu dy {msg}")
        torch.testing.assert_close(parts.sum(0), br.grad, rtol=1e-4, atol=1e-4, msg=f"gelu dbias {msg}")
        tiles.append([rb, rows, prefetch])
out["gelu_tiles"] = tiles
# the kernels' GELU and its derivative (bias 0, output gradient 1) against float64 over [-12, 12], tails included
v = torch.linspace(-12, 12, 4800).view(100, 48)
zero, ones = torch.zeros(48), torch.ones(100, 48)
o, dv, parts = torch.empty(100, 48), torch.empty(100, 48), torch.empty(50, 48)
fg._fwd_kernel.fn[(50, 1)](v, zero, o, 100, 48, RB=2, BC=fg._bc(48), ROWS=2, PREFETCH=False)
fg._bwd_kernel.fn[(50, 1)](ones, v, zero, dv, parts, 100, 48, RB=2, ROWS=2, BC=fg._bc(48), PREFETCH=False)
v64 = v.double()
phi64 = 0.5 * torch.special.erfc(-v64 / 2 ** 0.5)
g64, d64 = v64 * phi64, phi64 + v64 * torch.exp(-0.5 * v64 * v64) / (2 * torch.pi) ** 0.5
tiny = g64.abs() > 1e-30
erf_g = v * 0.5 * (1 + torch.erf(v * 0.7071067811865476))  # the textbook form in fp32 (F.gelu's)
out["gelu_vs_float64"] = [float((o.double() - g64).abs().max()), float((dv.double() - d64).abs().max()),
                          float(((o.double() - g64).abs() / g64.abs())[tiny].max()),
                          float(((erf_g.double() - g64).abs() / g64.abs())[tiny].max())]
yb = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
bb = torch.randn(32, requires_grad=True)
ob = fg.bias_gelu(yb, bb)
ob.float().sum().backward()
out["gelu_bf16_dtypes"] = [str(t.dtype) for t in (ob, yb.grad, bb.grad)]
out["gelu_bf16_max_err"] = float((ob.float() - F.gelu(yb.detach().float() + bb.detach())).abs().max())
ye = torch.zeros(0, 16, requires_grad=True)
be = torch.zeros(16, requires_grad=True)
fg.bias_gelu(ye, be).sum().backward()
out["gelu_empty"] = [list(ye.grad.shape), float(be.grad.abs().sum())]

# the MLM cross-entropy (fused_ce): loss and logit gradients against eager on fp32 logits; 5000 columns = 2 or 3
# blocks with a short last one, ignored rows, an upstream gradient other than 1
from sessionbert.models import fused_ce as fc
for m, v in ((37, 5000), (5, 100)):
    x = (torch.randn(m, v) * 3).requires_grad_()
    y = torch.randint(0, v, (m,))
    y[1] = -100
    x2 = x.detach().clone().requires_grad_()
    loss = fc.cross_entropy(x, y)
    loss.backward(torch.tensor(2.0))
    ref = F.cross_entropy(x2, y, ignore_index=-100)
    ref.backward(torch.tensor(2.0))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5, msg=f"ce loss at {m}x{v}")
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-7, msg=f"ce grad at {m}x{v}")
    out[f"ce_{m}x{v}"] = "equal"
m, v = 9, 5000
x, y = torch.randn(m, v) * 3, torch.randint(0, v, (m,))
y[0] = -100
xr = x.clone().requires_grad_()
F.cross_entropy(xr, y, ignore_index=-100, reduction="sum").backward()
ref = F.cross_entropy(x, y, ignore_index=-100, reduction="none")
tiles = []
for blk in (4096, 2048):  # every block width of the autotuned configs, launched directly
    loss, lse = torch.empty(m), torch.empty(m)
    fc._fwd_kernel.fn[(m,)](x, y, loss, lse, v, v, -100, BLOCK=blk)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5, msg=f"ce fwd BLOCK={blk}")
    torch.testing.assert_close(lse, torch.logsumexp(x, 1), rtol=1e-5, atol=1e-5, msg=f"ce lse BLOCK={blk}")
    dl = torch.empty(m, v)
    fc._bwd_kernel.fn[(m, -(-v // blk))](x, y, lse, (y != -100).float(), dl, v, v, BLOCK=blk)
    torch.testing.assert_close(dl, xr.grad, rtol=1e-4, atol=1e-7, msg=f"ce bwd BLOCK={blk}")
    tiles.append(blk)
out["ce_tiles"] = tiles
xb = torch.randn(6, 300, dtype=torch.bfloat16, requires_grad=True)
lb = fc.cross_entropy(xb, torch.randint(0, 300, (6,)))
lb.backward()
out["ce_bf16_dtypes"] = [str(lb.dtype), str(xb.grad.dtype)]
xe = torch.zeros(0, 10, requires_grad=True)
le = fc.cross_entropy(xe, torch.zeros(0, dtype=torch.long))
le.backward()
out["ce_empty"] = [str(float(le)), list(xe.grad.shape)]
try:
    fc.cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, -100]))
    out["ce_bad_label"] = "accepted"
except RuntimeError as e:
    out["ce_bad_label"] = str(e)

# the attention kernels (fused_attention) against the padded SDPA fallback: sessions of 1 to 300 tokens (one key
# block, and several: the dq kernel), q / k / v as column views of one projection, the Q / K / V bias gradients summed
# in the kernels (bias_grads); every tile shape the autotuners are offered on a GPU, launched one at a time
import triton
from sessionbert.models import fused_attention as fa
from sessionbert.models.packed import varlen_attention


# max error of the output and of the q / k / v and bias gradients, relative to the larger of 1 and the reference's
# largest magnitude (the key bias's gradient is ~0 in exact maths: softmax ignores a shift per query). `queries`: a
# subset of positions as queries (q_rows: the MLM's masked rows, some sessions without any, filler rows after them as
# the collator appends), against the fallback's gather of those query rows
from sessionbert.models.packed import QueryRows


def attention_case(lens, h=2, d=16, queries=False):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(len(lens) + (7 if queries else 0))
    qr, m = None, n
    if queries:
        sel = (torch.rand(n, generator=g) < 0.3).nonzero().squeeze(1)
        sel = sel[(sel < int(cu[1])) | (sel >= int(cu[2]))] if len(lens) > 2 else sel  # session 1: no query
        cu_q = torch.searchsorted(sel, cu.long()).to(torch.int32)
        counts = cu_q[1:] - cu_q[:-1]
        m = len(sel)
        qr = QueryRows(torch.cat([sel, torch.zeros(5, dtype=torch.long)]), cu_q, int(counts.max()), m)
    base, go = torch.randn(n, 3, h, d, generator=g), torch.randn(m, h, d, generator=g)
    bias = torch.randn(3, h * d, generator=g)
    res = []
    for fused in (True, False):
        qkv = base.detach().clone().requires_grad_()  # a leaf of its own per path
        bs = [b.clone().requires_grad_() for b in bias]
        q, k, v = (t + (b.detach() if fused else b).view(h, d) for t, b in zip(qkv.unbind(1), bs))
        o = varlen_attention(q, k, v, cu, max(lens), fused=fused, bias_grads=bs if fused else None, q_rows=qr)
        o.backward(go)
        res.append([o.detach(), qkv.grad, *(b.grad for b in bs)])
    if queries:
        assert res[0][0].shape == (m, h, d) and (len(lens) <= 2 or int(counts[1]) == 0)
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) for a, b in zip(*res))


tiles = {"_attn_fwd": [{"BLOCK_M": m, "BLOCK_N": n} for m in (16, 32, 64, 128) for n in (16, 64, 128)],
         "_attn_bwd_kv": [{"BLOCK_M": m} for m in (16, 32, 64, 128)],
         "_attn_bwd_q": [{"BLOCK_M": m} for m in (16, 32, 64, 128)]}
errs = {}
for name, cfgs in tiles.items():
    tuner = getattr(fa, name)
    offered = tuner.configs
    for kw in cfgs:
        tuner.configs = [triton.Config(kw, num_warps=4)]
        tuner.cache.clear()
        cases = [[5, 128, 1, 77, 130, 3, 200]]
        if name == "_attn_bwd_kv":  # backward programs of 64 and of 32 keys (_bwd_block_n: every session that short)
            cases += [[5, 64, 1, 37, 3], [5, 20, 1, 9, 32]]
        errs[f"{name}{kw}"] = max(attention_case(c) for c in cases)
        errs[f"{name}{kw}q_rows"] = max(attention_case(c, queries=True) for c in cases)
    tuner.configs = offered
    tuner.cache.clear()
out["attn_tiles_max_rel_err"] = max(errs.values())
out["attn_tiles"] = len(errs)
out["attn_q_rows_max_rel_err"] = max(v for k, v in errs.items() if k.endswith("q_rows"))
# no query at all (a batch without a masked position): empty output, zero gradients
qkv0 = torch.randn(6, 3, 2, 16).requires_grad_()
o0 = varlen_attention(*qkv0.unbind(1), torch.tensor([0, 6], dtype=torch.int32), 6, fused=True,
                      q_rows=QueryRows(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0], dtype=torch.int32), 0, 0))
o0.sum().backward()
out["attn_no_query"] = [list(o0.shape), float(qkv0.grad.abs().max())]
# (bf16: on the GPU, experiments/device/attention_check.py; the interpreter's bf16 dot products are not usable)
try:
    fa.attention(*torch.zeros(3, 4, 2, 12).unbind(0), torch.tensor([0, 4]), 4)
    out["attn_bad_head_dim"] = "accepted"
except ValueError as e:
    out["attn_bad_head_dim"] = str(e)

# the packed encoder with fused_attention (alone; with one Q/K/V GEMM; with every switch) against the plain packed
# path: same loss, same gradients of every parameter (the Q / K / V biases' summed in the kernels)
sys.path.insert(0, ".")
from sessionbert.data.datasets import MLMCollator, PackedMLMCollator
from tests.test_packed import MASK, PAD, SPECIAL, VOCAB, _items, _module
batch = PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3), max_len=32, multiple=64,
                          label_multiple=16)(_items([9, 30, 4, 17, 25], 1))
plain = _module()
lp = plain.packed_loss(batch)
lp.backward()
gp = dict(plain.named_parameters())
enc = {}
every = dict(fused_qkv=True, fused_norm=True, fused_gelu=True, fused_residual=True, fused_ce=True)
from sessionbert.models import branch_linear as bl
joined_calls, _joined = [], bl._joined
bl._joined = lambda dys: (lambda r: joined_calls.append(r is not None) or r)(_joined(dys))
for name, knobs in (("alone", {}), ("qkv", {"fused_qkv": True}), ("all", every)):
    joined_calls.clear()
    m = _module(fused_attention=True, **knobs)
    lm = m.packed_loss(batch)
    lm.backward()
    enc[name] = [abs(float(lm) - float(lp)), max(float((p.grad - gp[k].grad).abs().max())
                                                 for k, p in m.named_parameters() if gp[k].grad is not None),
                 sum(joined_calls)]  # Q / K / V backwards that took dq, dk, dv as one matrix (branch_in)
bl._joined = _joined
out["attn_encoder"] = enc

# under torch.compile (pretrain.compile with the kernels): they stay out of the graph and run as in eager mode; the
# compiled packed encoder gives the eager one's loss and gradients (aot_eager: no C++ compiler needed)
import functools
from sessionbert.models.packed import packed_hidden
batch = PackedMLMCollator(MLMCollator(PAD, MASK, VOCAB, SPECIAL, 0.25, seed=3), max_len=32, multiple=64,
                          label_multiple=16)(_items([9, 30, 4, 17, 25], 1))
fwd = functools.partial(packed_hidden, fused_qkv=True, fused_norm=True, fused_gelu=True, fused_residual=True,
                        fused_attention=True)
m_eager, m_comp = _module(fused_ce=True), _module(fused_ce=True)
m_eager._packed, m_comp._packed = fwd, torch.compile(fwd, backend="aot_eager")
calls = []


def counted(mod):  # each module's kernel entry, counting its calls
    orig = mod._apply
    mod._apply = lambda *a: calls.append(mod.__name__) or orig(*a)


from sessionbert.models import branch_linear as bl
for mod in (fn, fg, fc, bl, fa):
    counted(mod)
le, lc = m_eager.packed_loss(batch), m_comp.packed_loss(batch)
le.backward()
lc.backward()
gc = dict(m_comp.named_parameters())
out["compiled"] = [float(le), float(lc), max(float((gc[k].grad - p.grad).abs().max())
                                             for k, p in m_eager.named_parameters() if p.grad is not None)]
out["compiled_kernel_calls"] = sorted(set(calls)), len(calls)

# no rows
e = torch.zeros(0, 16, requires_grad=True)
ye = fn.dropout_add_layer_norm(e, torch.zeros(0, 16), torch.nn.LayerNorm(16), 0.1)
ye.sum().backward()
out["empty"] = list(ye.shape)

# the dropout mask's draws (`_keep`: eight 16-bit draws per Philox call): the drop share in each of the eight column
# slots of a call, and no tie between the two halves of one 32-bit draw (columns 4 apart in a group of eight)
torch.manual_seed(5)
ar = torch.randn(512, 256).requires_grad_()
yk = fn.dropout_add_layer_norm(ar, torch.randn(512, 256), torch.nn.LayerNorm(256), 0.5)
yk.backward(torch.randn(512, 256))
dropped = (ar.grad == 0).view(512, 32, 8).float()
out["keep_slot_shares"] = [round(float(v), 3) for v in dropped.mean((0, 1))]
out["keep_half_agreement"] = float((dropped[..., :4] == dropped[..., 4:]).float().mean())

sys.path.insert(0, "experiments")
import bench_fused_norm
rows = bench_fused_norm.main(["--device", "cpu", "--rows", "8", "--hidden", "16", "--repeats", "1"])
out["bench_variants"] = sorted({(r["group"], r["variant"], str(r["dropout"])) for r in rows})
rows = bench_fused_norm.main(["--device", "cpu", "--rows", "8", "--hidden", "16", "--repeats", "1", "--groups", "embed"])
out["bench_embed_variants"] = [r["variant"] for r in rows]
try:
    bench_fused_norm.main(["--device", "cpu", "--groups", "embed,norms"])
except SystemExit as e:
    out["bench_bad_group"] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_triton_kernels_under_the_interpreter():
    """The kernels (forward, backward, weight / bias partial sums, the dropout mask drawn again in backward, the dense
    bias folded in; bias + GELU with its bias-gradient partial sums; the MLM cross-entropy; attention within each
    session with the Q / K / V bias gradients, and the packed encoder with it) against eager PyTorch,
    through Triton's interpreter: 70 rows over several backward programs, widths that are not powers of two, column
    blocks with a short one, every tile shape of the autotuned configs, dropout, ignored rows, bf16 inputs, empty
    batches; the compiled packed encoder with every fused knob; and bench_fused_norm.py's rows."""
    out = interpreted(_KERNEL_CHECKS)
    assert out["p0_70x48"] == out["p0_5x20"] == "equal"
    assert 0.22 < out["drop_share"] < 0.38  # 3840 draws at p = 0.3: ~0.3 +- 0.0074
    assert out["same_seed_equal"] and out["other_seed_differs"]
    assert out["bf16_dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert out["bf16_max_err"] < 0.05
    assert out["empty"] == [0, 16]
    assert out["dense_bias_p0.0"] == out["dense_bias_p0.3"] == "equal"
    loss_eager, loss_compiled, grad_diff = out["compiled"]
    assert loss_compiled == loss_eager and grad_diff < 1e-5
    # tiny model, 2 layers, per forward pass: 4 LayerNorm, 2 GELU, 4 branch_in (Q/K/V, intermediate), 2 attention,
    # 1 loss; two models
    assert out["compiled_kernel_calls"] == [["sessionbert.models.branch_linear", "sessionbert.models.fused_attention",
                                             "sessionbert.models.fused_ce", "sessionbert.models.fused_gelu",
                                             "sessionbert.models.fused_norm"], 26]
    assert out["attn_tiles"] == 2 * (12 + 4 + 4) and out["attn_tiles_max_rel_err"] < 1e-4
    assert out["attn_q_rows_max_rel_err"] < 1e-4  # a subset of queries (QueryRows), each tile shape too
    assert out["attn_no_query"] == [[0, 2, 16], 0.0]
    assert "head_dim 12 must be a power of two >= 16" in out["attn_bad_head_dim"]
    assert sorted(out["attn_encoder"]) == ["all", "alone", "qkv"]
    for name, (dloss, dgrad, _) in out["attn_encoder"].items():
        assert dloss < 1e-5 and dgrad < 1e-5, (name, dloss, dgrad)
    # with branch_in (fused_residual, in "all") each layer's Q / K / V backward takes the kernels' dq, dk, dv as one
    # (N, 3H) matrix; without it there is no branch_in
    layers = ARCHS["tiny"]["num_hidden_layers"]
    assert [out["attn_encoder"][k][2] for k in ("alone", "qkv", "all")] == [0, 0, layers]
    assert out["ce_37x5000"] == out["ce_5x100"] == "equal"
    assert out["ce_tiles"] == [4096, 2048]
    assert out["ce_bf16_dtypes"] == ["torch.float32", "torch.bfloat16"]
    assert out["ce_empty"] == ["nan", [0, 10]]  # no counted row: NaN, as F.cross_entropy
    assert "a label outside [0, 10) that is not ignore_index -100" in out["ce_bad_label"]
    assert out["ln_tiles"] == [[rb, rows, pf] for rb in (1, 2, 4, 8) for rows in (16, 32) for pf in (False, True)]
    assert out["gelu_70x48"] == out["gelu_9x1500"] == "equal"
    # fp32-exact GELU and derivative (absolute), and relative accuracy in the negative tail, where the textbook
    # 0.5 v (1 + erf(v / sqrt 2)) in fp32 loses every digit (1 + erf cancels)
    g_abs, d_abs, g_rel, erf_rel = out["gelu_vs_float64"]
    assert g_abs < 1e-6 and d_abs < 1e-6 and g_rel < 1e-4 and erf_rel > 0.5
    assert out["gelu_tiles"] == [[rb, rows, pf] for rb in (2, 4, 8) for rows in (32, 64) for pf in (False, True)]
    assert out["gelu_bf16_dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert out["gelu_bf16_max_err"] < 0.05
    assert out["gelu_empty"] == [[0, 16], 0.0]
    assert out["bench_variants"] == [
        ["dense_gelu", "eager", "None"], ["dense_gelu", "fused", "None"], ["dense_norm", "eager", "0.1"],
        ["dense_norm", "fused", "0.1"], ["embed", "eager", "0.1"], ["embed", "fused", "0.1"],
        ["embed", "fused_index_add", "0.1"], ["gelu", "eager", "None"], ["gelu", "fused", "None"],
        ["norm", "eager", "0.0"], ["norm", "eager", "0.1"], ["norm", "fused", "0.0"], ["norm", "fused", "0.1"]]
    assert out["bench_embed_variants"] == ["eager", "fused", "fused_index_add"]
    # 16,384 draws per slot at p = 0.5: share 0.5 +- 0.004 (one sigma); two independent halves agree half the time
    assert all(0.48 < v < 0.52 for v in out["keep_slot_shares"]), out["keep_slot_shares"]
    assert 0.48 < out["keep_half_agreement"] < 0.52
    assert "--groups embed,norms: unknown ['norms']" in out["bench_bad_group"]


def test_bench_gpu_ab_of_fused_norm_and_its_goal_keys(tmp_path):
    """experiments/bench_gpu.py on a CPU, tiny model: `--fused-norm also` adds the fused variant beside the plain one,
    `--fused-gelu only` (and `--fused-residual only`, `--fused-ce only`, `--fused-attention only`) put that switch in
    every packed variant; the goal keys name the fastest variant; keys from
    other benchmarks already in the output file are kept."""
    import numpy as np

    from .conftest import experiment_module

    mod = experiment_module("bench_gpu")
    lengths = tmp_path / "lengths.npy"
    np.save(lengths, np.random.default_rng(0).integers(8, 64, 500))
    out = tmp_path / "bench_gpu.json"
    out.write_text(json.dumps({"ddp_scaling_2gpu": 2.07, "paper_scale_seconds": 1122.5, "mfu_seq64": 0.9,
                               "previous_paper_scale_session12": {"paper_scale_seconds": 1045.3}}))
    mod.main(["--model", "tiny", "--no-peer", "--only-packed", "--fused-norm", "also", "--fused-gelu", "only",
              "--fused-residual", "only", "--fused-ce", "only", "--fused-attention", "only", "--seq-lens", "64",
              "--tokens-per-step", "2048", "--pack-multiple", "256", "--steps", "2", "--warmup", "1",
              "--lengths", str(lengths), "--out", str(out), "--peak-tflops", "1e-4"])  # a CPU's peak: MFU not ~0
    res = json.loads(out.read_text())
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["ours packed + fused GELU + fused residual + fused CE + fused attention",
                      "ours packed + fused norm + fused GELU + fused residual + fused CE + fused attention"]
    assert [(r["fused_norm"], r["fused_gelu"], r["fused_residual"], r["fused_ce"], r["fused_attention"],
             r["fused_qkv"]) for r in res["runs"]] == [(False, True, True, True, True, False),
                                                        (True, True, True, True, True, False)]
    best = max(res["runs"], key=lambda r: r["real_tokens_per_s"])
    assert res["real_tokens_per_s_seq64"] == best["real_tokens_per_s"] and res["headline_path_seq64"] == best["label"]
    assert res["mfu_seq64"] == best["mfu"] != 0.9  # a goal key is recomputed, not carried
    # the packed path's last layer runs on the masked rows only: the work it executes is less than the model's count
    assert all(0 < r["mfu_executed"] < r["mfu"] for r in res["runs"])
    import hashlib

    digest = hashlib.sha256(np.load(lengths).astype(np.int64).tobytes()).hexdigest()[:16]
    assert res["lengths"]["sim"]["sha256_16"] == digest  # which lengths a result was measured on
    assert res["ddp_scaling_2gpu"] == 2.07 and res["paper_scale_seconds"] == 1122.5
    assert res["previous_paper_scale_session12"] == {"paper_scale_seconds": 1045.3}
    assert "real_tokens_per_s_seq64_packed_fusednorm_fusedgelu_fusedres_fusedce_fusedattn" in res


def test_bench_gpu_counts_the_flops_the_packed_path_skips():
    """`mfu_executed`'s count: the last layer past its attention on the masked rows only (#53), and its attention's
    scores and outputs on the masked queries only (#54: each session's keys x its non-query rows)."""
    from types import SimpleNamespace

    import numpy as np

    from .conftest import experiment_module

    mod = experiment_module("bench_gpu")
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8)
    assert mod.skipped_flops(cfg, 10, 3) == 6 * (4 * 4 + 2 * 4 * 8) * 7  # 7 of 10 rows past the attention not run
    assert mod.skipped_flops(cfg, 10, 3, np.array([6, 4]), np.array([2, 1])) == 6 * (80 * 7 + 2 * 4 * (6 * 4 + 4 * 3))


def test_gpu_trainers_turn_the_fused_switches_on(tmp_path):
    """trainer=gpu / trainer=ddp turn every pretrain.fused_* switch on (trainer.pretrain_fused); the CPU default leaves
    them off; each can still be set alone."""
    from sessionbert.config import validate

    from .conftest import make_cfg

    knobs = ("fused_qkv", "fused_norm", "fused_gelu", "fused_residual", "fused_ce", "fused_attention")
    assert [make_cfg(tmp_path).pretrain[k] for k in knobs] == [False] * 6
    for trainer in ("gpu", "ddp"):
        cfg = make_cfg(tmp_path, [f"trainer={trainer}"])
        validate(cfg)
        assert [cfg.pretrain[k] for k in knobs] == [True] * 6
    cfg = make_cfg(tmp_path, ["trainer=gpu", "pretrain.fused_norm=false", "trainer.pretrain_fused=true"])
    assert [cfg.pretrain[k] for k in knobs] == [True, False, True, True, True, True]
