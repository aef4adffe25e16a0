"""The Linear layers that open a BERT sub-block, with the residual's gradient summed in their input-gradient GEMM
(issue 6 goal 1, `pretrain.fused_residual`).

Each sub-block of a BERT layer reads its input `x` twice: through the Linear(s) that open the branch (the query, key
and value projections; the intermediate layer) and through the residual add before the closing LayerNorm. In eager
autograd the two gradients of `x` arrive separately: the branch's input gradient `dY W` from its own GEMM (for Q/K/V,
after stacking the attention's separate dq / dk / dv into one (N, 3H) tensor when the projections run as one GEMM),
and the residual's gradient from the LayerNorm's backward, and a separate `aten::add` sums them. Each of these is a
full pass over (N, H) or (N, 3H) activations: on an H200 the Q/K/V stack took ~3.6 ms and the adds ~3.7 ms of a
~174 ms packed step at seq 128 (experiments/notes_speed.md, session 8's profile).

Here one autograd Function runs the branch's Linear(s) and also passes `x` on as the residual, so its backward gets
the gradients of both uses together and sums them in cuBLAS's epilogue: `dx = d_res; dx += dq Wq; dx += dk Wk;
dx += dv Wv` (`addmm_`, beta = 1: C is read in the GEMM's epilogue instead of by a kernel of its own). dq, dk and dv
are used where the attention wrote them: nothing is stacked. The forward is unchanged (one GEMM over the concatenated
Q/K/V weights with `fuse=True`, as `pretrain.fused_qkv`); the weight and bias gradients are the same GEMMs and sums.

When the gradients of the outputs arrive as adjacent column slices of one buffer (the fused attention kernels write
dq, dk, dv so), backward takes them as one (N, 3H) matrix: one input-gradient GEMM over the concatenated weights
(K = 3H, the residual gradient read once) and one weight-gradient GEMM, instead of three each (+0.9% for the whole
step at seq 128 on an H200, notes_speed.md #45).

The residual gradient is accumulated in place. By the time this backward runs, every other reader of that tensor
has run: an eager residual add hands the same tensor to the branch's last dense layer, whose backward is upstream of
the gradients this Function waits for. A residual gradient that is not contiguous, or in another dtype than the
GEMMs', is not touched (the sum goes to a new tensor).

Same maths as the separate Linears and the add, up to rounding (tests/test_packed.py); runs wherever torch runs.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _joined(dys) -> torch.Tensor | None:
    """The (N, total width) matrix whose adjacent column slices, in order, the 2-D gradients `dys` are (the fused
    attention kernels write dq, dk, dv so), or None: then each is used on its own."""
    if len(dys) < 2 or any(d is None or d.dim() != 2 or d.stride(1) != 1 for d in dys):
        return None
    first, widths = dys[0], [d.shape[1] for d in dys]
    total = sum(widths)
    offset = first.storage_offset()
    for d, before in zip(dys, [0, *itertools.accumulate(widths)]):
        if (d.shape[0] != first.shape[0] or d.stride(0) != total or d.dtype != first.dtype
                or d.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or d.storage_offset() != offset + before):
            return None
    return first.as_strided((first.shape[0], total), (total, 1))


class _BranchIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k: int, fuse: bool, *params):
        weights, biases = params[:k], params[k:]
        dt = _compute_dtype(x)
        xc = x.to(dt)
        ws = [w.to(dt) for w in weights]
        bs = [None if b is None else b.to(dt) for b in biases]
        with torch.autocast(x.device.type, enabled=False):
            if fuse and k > 1:
                if len({b is None for b in bs}) > 1:
                    raise ValueError("branch_in: fuse needs every Linear with a bias or none with one")
                b = None if bs[0] is None else torch.cat(bs)
                ys = F.linear(xc, torch.cat(ws), b).split([w.shape[0] for w in ws], dim=-1)
            else:
                ys = [F.linear(xc, w, b) for w, b in zip(ws, bs)]
        ctx.save_for_backward(xc, *ws)
        ctx.k, ctx.dtypes = k, (x.dtype, [w.dtype for w in weights], [None if b is None else b.dtype for b in biases])
        return (*ys, x)

    @staticmethod
    def backward(ctx, *grads):
        xc, *ws = ctx.saved_tensors
        k = ctx.k
        x_dt, w_dts, b_dts = ctx.dtypes
        dys, d_res = grads[:k], grads[k]
        h = xc.shape[-1]
        x2 = xc.reshape(-1, h)
        need_x = ctx.needs_input_grad[0]
        dx = None  # (N, H) in the GEMMs' dtype: the residual gradient, then each dY W added in the GEMM epilogue
        if need_x and d_res is not None and d_res.dtype == xc.dtype and d_res.is_contiguous():
            dx = d_res.view(-1, h)
            d_res = None
        dws, dbs = [None] * k, [None] * k
        joined = _joined(dys)
        if joined is not None:  # one GEMM each for the input and the weight gradients, over the concatenated weights
            w_cat = torch.cat(ws)
            if need_x:
                dx = torch.mm(joined, w_cat) if dx is None else dx.addmm_(joined, w_cat)
            if any(ctx.needs_input_grad[3:3 + k]):
                dw_cat = torch.mm(joined.t(), x2).split([w.shape[0] for w in ws])
                dws = [dw.to(dt, copy=True) if ctx.needs_input_grad[3 + i] else None  # own storage per parameter
                       for i, (dw, dt) in enumerate(zip(dw_cat, w_dts))]
        for i, (dy, w) in enumerate(zip(dys, ws)):
            if dy is None:
                continue
            dy2 = dy.reshape(-1, w.shape[0])
            if joined is None:
                if need_x:
                    dx = torch.mm(dy2, w) if dx is None else dx.addmm_(dy2, w)
                if ctx.needs_input_grad[3 + i]:
                    dws[i] = torch.mm(dy2.t(), x2).to(w_dts[i])
            if b_dts[i] is not None and ctx.needs_input_grad[3 + k + i]:
                dbs[i] = dy2.sum(0, dtype=torch.float32).to(b_dts[i])
        if need_x:
            if dx is None:
                dx = d_res
            else:
                dx = dx.view(xc.shape).to(x_dt)
                if d_res is not None:  # a residual gradient that could not be accumulated in place
                    dx = dx + d_res
        return (dx if need_x else None, None, None, *dws, *dbs)


# Out of torch.compile graphs, as the fused kernels: with them (also kept out) in the same encoder, dynamo's
# reconstruction of this Function's outputs across the graph breaks failed ("a view ... modified inplace").
_apply = torch.compiler.disable(_BranchIn.apply)


def branch_in(x: torch.Tensor, linears: list[torch.nn.Linear], fuse: bool = False,
              bias: bool = True, bias_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """`(*[lin(x) for lin in linears], x)`: the outputs of the Linears that open a sub-block and `x` itself, to be used
    as the sub-block's residual (and nowhere else), so that backward sums both gradients of `x` in the GEMMs.
    `fuse`: one GEMM over the concatenated weights (the outputs are column slices of it); `bias=False`: the Linears'
    biases are left out (added later, as `fused_gelu` does), and get no gradient here; `bias_grad=False`: the biases
    are added but their gradients are left to the caller (the fused attention kernels sum them). Under autocast the
    GEMMs run in its dtype, as `F.linear` would."""
    weights = [lin.weight for lin in linears]
    biases = [(lin.bias if bias_grad else lin.bias.detach()) if bias else None for lin in linears]
    return _apply(x, len(linears), fuse, *weights, *biases)
