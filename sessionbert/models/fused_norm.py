"""Fused dropout + residual add + LayerNorm for the packed encoder (issue 6 goal 1, `pretrain.fused_norm`).

Each BERT layer ends its two sub-blocks with `LayerNorm(dropout(dense_out) + residual)`. In eager PyTorch that is
four kernels forward (dropout's mask and scale, the add, LayerNorm) and five backward (LayerNorm's input gradient, its
weight / bias gradient, the dropout mask product, the add's two outputs), each a full pass over the (N, 768)
activations; on an H200 they were ~26 ms of a ~186 ms packed step at seq 128 (`results/profile_*`). Here one Triton
kernel does the forward pass and one the backward pass (+4.9% real tokens/s for the whole step, notes_speed.md #29):

- forward: reads the dense output and the residual once, adds the dense layer's bias (`a_bias`: the packed encoder
  runs that GEMM without it), writes the LayerNorm input `z` (kept for backward, as eager keeps it), the output, and
  the per-row mean / reciprocal std;
- backward: reads the output gradient and `z` once, writes the gradients of the residual and of the dense output,
  and per-program partial sums of the LayerNorm weight / bias gradients and of the dense bias gradient (summed by
  one small torch reduction: the dense bias gradient needs no pass of its own over the (N, 768) gradient);
- dropout keeps no mask: it is drawn from a counter-based generator (Philox, eight 16-bit draws per call, `_keep`)
  seeded per call from torch's CPU generator (so `torch.manual_seed` makes runs repeatable), and drawn again in
  backward.

Why our own kernel: no library in our dependency set fuses these (Apex and TransformerEngine do, but need CUDA
builds users must compile); torch.compile fuses them, but its generated LayerNorm backward took 2.5 ms per call on an
H200 where eager's takes ~0.6 ms, so the compiled step was slower than eager (notes_speed.md #7, #28). Triton ships
with every CUDA build of torch. Where there is no Triton or no GPU, `dropout_add_layer_norm` runs the same maths in eager
PyTorch (the CPU tests also run the kernels themselves through Triton's interpreter, `tests/test_fused_norm.py`).

Same maths as `LayerNorm(dropout(a + a_bias) + x)` up to rounding, with statistics in fp32 and LayerNorm weights read in
their own dtype (fp32 master weights: no bf16 copies). Dropout draws differ from torch's (another generator).
"""
from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds ship without Triton
    triton = None

_MAX_ELEMENTS = 2**31 - 1  # dropout counters are int32 offsets of the (N, H) block


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device` (a CUDA device, or any device under Triton's
    interpreter, TRITON_INTERPRET=1, which the CPU tests use)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _configs(**grid) -> list:
    """Triton autotuning configs: the product of `grid`'s values (name -> options; `num_warps` and `num_stages` are
    the launch's). Under Triton's interpreter (CPU tests) only the first of each, as nothing is timed there."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        grid = {k: v[:1] for k, v in grid.items()}
    out = []
    for values in itertools.product(*grid.values()):
        kw = dict(zip(grid, values))
        launch = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        out.append(triton.Config(kw, **launch))
    return out


def _row_configs(loops: dict, **grid) -> list:
    """`_configs(**grid)` with one tile per program (ROWS = RB, no PREFETCH), and on a GPU also `_configs(**loops)`
    with PREFETCH (ROWS rows in tiles of RB): for the row-wise kernels whose programs take ROWS rows in tiles of RB."""
    out = _configs(**grid)
    for c in out:
        c.kwargs.update(ROWS=c.kwargs["RB"], PREFETCH=False)
    if os.environ.get("TRITON_INTERPRET") != "1":
        out += _configs(PREFETCH=[True], **loops)
    return out


if triton is not None:
    @triton.jit
    def _tile(A, rows, ok, cols, mc, n_cols):
        """The tile `rows` (those with `ok`) x `cols` (those with `mc`) of an (N, n_cols) tensor, in its dtype, zeros
        elsewhere (int32 offsets: the wrappers check N * n_cols < 2**31)."""
        return tl.load(A + rows[:, None] * n_cols + cols[None, :], mask=ok[:, None] & mc[None, :], other=0.0)

    @triton.jit
    def _pair(A, X, rows, ok, cols, mc, n_cols):
        """`_tile` of two (N, n_cols) tensors."""
        return _tile(A, rows, ok, cols, mc, n_cols), _tile(X, rows, ok, cols, mc, n_cols)

    @triton.jit
    def _normalise(z, m, n_cols, eps):
        """(z - mean, mean, rstd) of the fp32 tile z's rows over their columns in `m` (zeros outside it)."""
        mean = tl.sum(z, axis=1) / n_cols
        d = tl.where(m, z - mean[:, None], 0.0)
        return d, mean, 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / n_cols + eps)

    @triton.jit
    def _normalise_grad(dy, xh, w, rstd, n_cols):
        """LayerNorm's input gradient (fp32) from the output gradient dy, the normalised input xh, the weight w and
        the rows' rstd."""
        wdy = w[None, :] * dy
        c1 = tl.sum(xh * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        return (wdy - (xh * c1[:, None] + c2[:, None])) * rstd[:, None]

    @triton.jit
    def _keep(seed, rows, p, RB: tl.constexpr, BLOCK: tl.constexpr):
        """(RB, BLOCK) dropout keep-mask of `rows`: one Philox call (`tl.randint4x`, counter row * BLOCK / 8 + c)
        gives four 32-bit draws, each split into two 16-bit uniforms, so the RNG costs an eighth of one `tl.rand` per
        element (session 12: a quarter, one 32-bit draw each; the LayerNorm forward with dropout 0.273 -> 0.220 ms
        on an H200, the step +1.2%: notes_speed.md #52). Keep where the 16-bit draw is >= round(p * 65536): the drop
        probability is p to within 2**-17 (0.100006 for 0.1). The eight draws of a counter fill eight adjacent
        columns; backward draws the same mask again from (seed, rows)."""
        q = tl.arange(0, BLOCK // 8)
        r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * (BLOCK // 8) + q[None, :])
        thr = tl.cast(p * 65536.0 + 0.5, tl.int32)
        k0, k1, k2, k3 = (r0 & 0xFFFF) >= thr, (r1 & 0xFFFF) >= thr, (r2 & 0xFFFF) >= thr, (r3 & 0xFFFF) >= thr
        k4, k5 = ((r0 >> 16) & 0xFFFF) >= thr, ((r1 >> 16) & 0xFFFF) >= thr
        k6, k7 = ((r2 >> 16) & 0xFFFF) >= thr, ((r3 >> 16) & 0xFFFF) >= thr
        k = tl.join(tl.join(tl.join(k0, k1), tl.join(k2, k3)), tl.join(tl.join(k4, k5), tl.join(k6, k7)))
        return tl.reshape(k, (RB, BLOCK))

    # Tile sizes picked by Triton's autotuner on the first call for each width (a few ms, once per process): the best
    # rows per tile and warps differ between GPUs. The seed and the row count are not specialised on (a new value
    # must not compile a new kernel). Each program takes ROWS rows in tiles of RB: one tile (ROWS = RB, the configs
    # measured in sessions 7-10), or a loop with PREFETCH, the next tile's loads issued before this tile's
    # statistics and stores (notes_speed.md #43: on an H200 the one-tile RB 4 stayed fastest, 0.272 ms; the loop
    # offered is the best of the eight tried there, 0.283 ms).
    @triton.autotune(configs=_row_configs(dict(RB=[2], ROWS=[16], num_warps=[4]), RB=[4, 1, 2, 8], num_warps=[4, 8]),
                     key=["n_cols", "DROPOUT", "HAS_AB"])
    @triton.jit(do_not_specialize=["n_rows", "seed"])
    def _fwd_kernel(A, AB, X, W, B, Z, Y, Mean, Rstd, n_rows, n_cols, eps, p, seed,
                    BLOCK: tl.constexpr, RB: tl.constexpr, DROPOUT: tl.constexpr, HAS_AB: tl.constexpr,
                    ROWS: tl.constexpr, PREFETCH: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        mc = cols < n_cols
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)
        if HAS_AB:  # the dense layer's bias, added here instead of in its GEMM (its gradient is summed in backward)
            ab = tl.load(AB + cols, mask=mc, other=0.0).to(tl.float32)
        rows = tl.program_id(0) * ROWS + tl.arange(0, RB)
        end = tl.minimum(tl.program_id(0) * ROWS + ROWS, n_rows)
        if PREFETCH:
            a_n, x_n = _pair(A, X, rows, rows < end, cols, mc, n_cols)
        for i in range(0, ROWS // RB):
            m = (rows < end)[:, None] & mc[None, :]
            off = rows[:, None] * n_cols + cols[None, :]  # int32: the wrapper checks N * H < 2**31
            if PREFETCH:
                a, x = a_n, x_n
                a_n, x_n = _pair(A, X, rows + RB, rows + RB < end, cols, mc, n_cols)
            else:
                a, x = _pair(A, X, rows, rows < end, cols, mc, n_cols)
            a = a.to(tl.float32)
            if HAS_AB:
                a += ab[None, :]
            if DROPOUT:
                a = tl.where(_keep(seed, rows, p, RB, BLOCK), a / (1.0 - p), 0.0)
            zq = (a + x.to(tl.float32)).to(Z.dtype.element_ty)
            tl.store(Z + off, zq, mask=m)
            # statistics of the stored (rounded) z: backward recomputes from it
            d, mean, rstd = _normalise(zq.to(tl.float32), m, n_cols, eps)
            tl.store(Y + off, (d * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=m)
            tl.store(Mean + rows, mean, mask=rows < end)
            tl.store(Rstd + rows, rstd, mask=rows < end)
            rows += RB

    @triton.jit
    def _bwd_rows(DY, Z, Mean, Rstd, rows, ok, cols, mc, n_cols):
        """The backward's inputs for `rows` (those with `ok`): dy and z tiles in their dtype, mean, rstd."""
        dy, z = _pair(DY, Z, rows, ok, cols, mc, n_cols)  # int32 offsets: the wrapper checks N * H < 2**31
        return dy, z, tl.load(Mean + rows, mask=ok, other=0.0), tl.load(Rstd + rows, mask=ok, other=0.0)

    # Each program takes ROWS rows in tiles of RB (both autotuned) and writes one row of partial weight / bias
    # gradients, added by one torch reduction. The partial sums accumulate as (RB, BLOCK) tiles and are reduced over
    # rows once at the end: a reduction over the tile's rows in every step of the loop (the first version) kept the
    # backward at ~1.1 TB/s (notes_speed.md #31). With the dense layer's bias folded in (HAS_AB) its gradient, the
    # column sum of DA, is a third partial sum here instead of a pass of its own. The configs: the fastest of a 48-config
    # sweep on an H200 (RB 1, ROWS 32, 4 warps; experiments/results/fused_kernels_dev) and its neighbours, each with and
    # without PREFETCH: the next tile's loads issued before this tile's reductions and stores, so that their latency
    # overlaps this tile's work (at ~2 TB/s the loop waited on each tile's loads in turn; notes_speed.md #43: 0.367 ->
    # 0.304 ms with RB 1, ROWS 16, 4 warps; tiles of 2 rows were slower with and without, and are no longer offered).
    @triton.autotune(configs=_configs(PREFETCH=[False, True], RB=[1], ROWS=[32, 16], num_warps=[4, 8]),
                     key=["n_cols", "DROPOUT", "HAS_AB"])
    @triton.jit(do_not_specialize=["n_rows", "seed"])
    def _bwd_kernel(DY, Z, W, Mean, Rstd, DX, DA, DWp, DBp, DABp, n_rows, n_cols, p, seed,
                    BLOCK: tl.constexpr, RB: tl.constexpr, ROWS: tl.constexpr, DROPOUT: tl.constexpr,
                    HAS_AB: tl.constexpr, PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mc = cols < n_cols
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        dw = tl.zeros([RB, BLOCK], dtype=tl.float32)
        db = tl.zeros([RB, BLOCK], dtype=tl.float32)
        dab = tl.zeros([RB, BLOCK], dtype=tl.float32)
        rows = pid * ROWS + tl.arange(0, RB)
        end = tl.minimum(pid * ROWS + ROWS, n_rows)  # the last program's tail: nothing loaded or stored, zeros summed
        if PREFETCH:
            dy_n, z_n, mean_n, rstd_n = _bwd_rows(DY, Z, Mean, Rstd, rows, rows < end, cols, mc, n_cols)
        for i in range(0, ROWS // RB):
            ok = rows < end
            m = ok[:, None] & mc[None, :]
            off = rows[:, None] * n_cols + cols[None, :]
            if PREFETCH:
                dy, z, mean, rstd = dy_n, z_n, mean_n, rstd_n
                dy_n, z_n, mean_n, rstd_n = _bwd_rows(DY, Z, Mean, Rstd, rows + RB, rows + RB < end, cols, mc, n_cols)
            else:
                dy, z, mean, rstd = _bwd_rows(DY, Z, Mean, Rstd, rows, ok, cols, mc, n_cols)
            dy = dy.to(tl.float32)
            xh = tl.where(m, (z.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            dz = _normalise_grad(dy, xh, w, rstd, n_cols)
            tl.store(DX + off, dz.to(DX.dtype.element_ty), mask=m)
            if DROPOUT:
                dz = tl.where(_keep(seed, rows, p, RB, BLOCK), dz / (1.0 - p), 0.0)
            tl.store(DA + off, dz.to(DA.dtype.element_ty), mask=m)
            dw += dy * xh
            db += dy
            if HAS_AB:
                dab += dz
            rows += RB
        tl.store(DWp + pid * n_cols + cols, tl.sum(dw, axis=0), mask=mc)
        tl.store(DBp + pid * n_cols + cols, tl.sum(db, axis=0), mask=mc)
        if HAS_AB:
            tl.store(DABp + pid * n_cols + cols, tl.sum(dab, axis=0), mask=mc)


def _block(n_cols: int) -> int:
    return max(triton.next_power_of_2(n_cols), 16)


def row_partial_sums(kernel, n: int, h: int, count: int, device, launch) -> torch.Tensor:
    """(count, h) fp32 column sums written by an autotuned backward `kernel` whose programs each take ROWS rows (a
    tuned parameter) and write one row of partial sums into each of `count` (programs, h) buffers: `launch(parts)`
    runs it on `parts` (count, programs, h). The buffers are sized for the fewest rows per program among the configs;
    the picked config's ROWS says how many rows were written. No rows: zeros (nothing is launched)."""
    most = max(1, -(-n // min(c.kwargs["ROWS"] for c in kernel.configs)))
    parts = torch.empty(count, most, h, dtype=torch.float32, device=device)
    if not n:
        return parts[:, 0].zero_()
    launch(parts)
    return parts[:, :-(-n // kernel.best_config.kwargs["ROWS"])].sum(1)


class _DropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, a_bias, x, weight, bias, p: float, eps: float):
        shape = a.shape
        a2, x2 = a.reshape(-1, shape[-1]).contiguous(), x.reshape(-1, shape[-1]).contiguous()
        n, h = a2.shape
        dtype = torch.promote_types(a2.dtype, x2.dtype)
        z, y = torch.empty(n, h, dtype=dtype, device=a.device), torch.empty(n, h, dtype=dtype, device=a.device)
        mean = torch.empty(n, dtype=torch.float32, device=a.device)
        rstd = torch.empty_like(mean)
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if p > 0 else 0  # CPU generator: no GPU sync
        if n:
            _fwd_kernel[lambda meta: (triton.cdiv(n, meta["ROWS"]),)](
                a2, weight if a_bias is None else a_bias, x2, weight, bias, z, y, mean, rstd, n, h, eps, p, seed,
                BLOCK=_block(h), DROPOUT=p > 0, HAS_AB=a_bias is not None)
        ctx.save_for_backward(z, weight, mean, rstd)
        ctx.p, ctx.seed, ctx.shape = p, seed, shape
        ctx.dtypes = (a.dtype, None if a_bias is None else a_bias.dtype, x.dtype, weight.dtype, bias.dtype)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        z, weight, mean, rstd = ctx.saved_tensors
        n, h = z.shape
        dy2 = dy.reshape(n, h).contiguous()
        a_dt, ab_dt, x_dt, w_dt, b_dt = ctx.dtypes
        dx = torch.empty(n, h, dtype=x_dt, device=z.device)
        da = torch.empty(n, h, dtype=a_dt, device=z.device)

        def launch(parts):  # weight, bias (and dense bias) gradients: per-program partial sums
            _bwd_kernel[lambda meta: (triton.cdiv(n, meta["ROWS"]),)](
                dy2, z, weight, mean, rstd, dx, da, parts[0], parts[1], parts[-1], n, h, ctx.p, ctx.seed,
                BLOCK=_block(h), DROPOUT=ctx.p > 0, HAS_AB=ab_dt is not None)

        sums = row_partial_sums(_bwd_kernel, n, h, 3 if ab_dt is not None else 2, z.device, launch)
        dab = None if ab_dt is None else sums[2].to(ab_dt)
        return da.view(ctx.shape), dab, dx.view(ctx.shape), sums[0].to(w_dt), sums[1].to(b_dt), None, None


# Kept out of torch.compile graphs (`pretrain.compile` with these kernels): dynamo would trace into the autotuner's
# Python dispatch and the backward's read of the picked config; here they run as they do in eager mode, between
# compiled regions.
_apply = torch.compiler.disable(_DropoutAddLayerNorm.apply)


def dropout_add_layer_norm(a: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm, p: float,
                           a_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`norm(dropout(a + a_bias, p) + x)` (the end of a BERT sub-block, `a` its dense layer's output without the bias,
    `a_bias` that bias; `p` 0 when not training): one Triton kernel each way where `available(a.device)`, otherwise
    eager PyTorch. a, x: (..., H), same shape; a_bias (H,) or None; the result has their dtype."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_add_layer_norm: dropout probability must be in [0, 1), got {p}")
    if a.shape != x.shape or a.shape[-1] != norm.normalized_shape[-1] or (
            a_bias is not None and tuple(a_bias.shape) != (a.shape[-1],)):
        raise ValueError(f"dropout_add_layer_norm: shapes {tuple(a.shape)} / {tuple(x.shape)}"
                         f"{'' if a_bias is None else f' / bias {tuple(a_bias.shape)}'} for a LayerNorm of "
                         f"{tuple(norm.normalized_shape)}")
    if available(a.device) and a.numel() <= _MAX_ELEMENTS:
        return _apply(a, a_bias, x, norm.weight, norm.bias, float(p), float(norm.eps))
    return eager_dropout_add_layer_norm(a, x, norm, p, a_bias)


def eager_dropout_add_layer_norm(a: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm, p: float,
                                 a_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same in eager PyTorch, as the unfused packed encoder computes it (torch's dropout, then `layer_norm_as`)."""
    if a_bias is not None:
        a = a + a_bias.to(a.dtype)
    z = F.dropout(a, p, training=p > 0) + x
    return layer_norm_as(z, norm, z.dtype)


def layer_norm_as(y: torch.Tensor, mod: torch.nn.LayerNorm, dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm of `y` in `dtype` (weights cast to it; CUDA's kernel wants one dtype and accumulates in fp32)."""
    with torch.autocast(y.device.type, enabled=False):
        return F.layer_norm(y, mod.normalized_shape, mod.weight.to(dtype), mod.bias.to(dtype), mod.eps)
