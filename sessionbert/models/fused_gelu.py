"""Fused bias + GELU for the packed encoder's intermediate layer (issue 6 goal 1, `pretrain.fused_gelu`).

BERT's feed-forward block is `gelu(x W1^T + b1)` (H -> 4H), the widest activations of the model. In eager PyTorch the
bias rides in the GEMM's epilogue, GELU is one pass forward (read the (N, 4H) pre-activation, write the output) and
its gradient one pass backward (read the output gradient and the pre-activation, write the pre-activation gradient),
and the bias gradient is one more full read of that (N, 4H) gradient (`aten::sum` in `AddmmBackward`). Here the GEMM
runs without its bias, one Triton kernel adds it and applies GELU, and one backward kernel writes the pre-activation
gradient and, from the same registers, per-program partial column sums that one small torch reduction turns into the
bias gradient: the separate pass over the (N, 4H) gradient is gone. Exact (erf) GELU, as BERT's `hidden_act="gelu"`,
to fp32 precision (`_gelu_parts`); arithmetic in fp32, inputs and outputs in the activations' dtype; the bias read in
its own dtype (fp32 master).

Why our own kernel: cuBLASLt has bias-gradient and GELU epilogues, but torch exposes only the forward tanh-GELU one
(`_addmm_activation`); torch.compile's fused kernels for the encoder's elementwise work were slower than eager here
(notes_speed.md #7, #28). Triton ships with every CUDA build of torch. Without Triton or a GPU, `bias_gelu` is eager
PyTorch (the CPU tests also run the kernels themselves through Triton's interpreter, tests/test_fused_norm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_norm import _MAX_ELEMENTS, _configs, _pair, _row_configs, _tile, available, row_partial_sums, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gelu_parts(v):
        """(gelu(v), gelu'(v)) in fp32, exact GELU v * Phi(v) and its derivative Phi(v) + v phi(v), where the normal
        CDF Phi(v) = erfc(-v / sqrt 2) / 2 comes from erfc's Chebyshev fit of Numerical Recipes (`erfcc`: relative
        error < 1.2e-7 everywhere, one exp and nine FMAs) instead of libdevice's erf: forward 0.539 -> 0.475 ms on an
        H200 at 131,072 x 3072, the step +0.5% (notes_speed.md #51; not fewer instructions: about as many, FMAs with
        folded constants where erff moves its constants into registers, experiments/kernel_sass.py), and accurate in
        the negative tail too, where 1 + erf(v / sqrt 2) cancels (tests/test_fused_norm.py: against float64)."""
        z = tl.abs(v) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * z)
        r = 1.48851587 + t * (-0.82215223 + t * 0.17087277)
        r = -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * r))
        r = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * r)))
        half_erfc = 0.5 * t * tl.exp(r - z * z)  # erfc(|v| / sqrt 2) / 2 = Phi(-|v|)
        cdf = tl.where(v < 0, half_erfc, 1.0 - half_erfc)
        return v * cdf, cdf + v * tl.exp(-0.5 * v * v) * 0.3989422804014327

    # Each program takes ROWS rows of one BC-wide column block in tiles of RB: one tile (ROWS = RB), or a loop with
    # PREFETCH, the next tile's load issued before this tile's GELU and store (fused_norm._row_configs; on an H200 the
    # loops of 2-row tiles were the fastest, 0.536 ms against 0.582 for one tile: notes_speed.md #43).
    @triton.autotune(configs=_row_configs(dict(RB=[2], ROWS=[32, 16], num_warps=[8, 4]), RB=[4, 8], num_warps=[4, 8]),
                     key=["n_cols"])
    @triton.jit(do_not_specialize=["n_rows"])
    def _fwd_kernel(Y, B, O, n_rows, n_cols, RB: tl.constexpr, BC: tl.constexpr, ROWS: tl.constexpr,
                    PREFETCH: tl.constexpr):
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mc = cols < n_cols
        b = tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)
        rows = tl.program_id(0) * ROWS + tl.arange(0, RB)
        end = tl.minimum(tl.program_id(0) * ROWS + ROWS, n_rows)
        if PREFETCH:
            y_n = _tile(Y, rows, rows < end, cols, mc, n_cols)
        for i in range(0, ROWS // RB):
            m = (rows < end)[:, None] & mc[None, :]
            off = rows[:, None] * n_cols + cols[None, :]  # int32: bias_gelu checks N * C < 2**31
            if PREFETCH:
                y = y_n
                y_n = _tile(Y, rows + RB, rows + RB < end, cols, mc, n_cols)
            else:
                y = _tile(Y, rows, rows < end, cols, mc, n_cols)
            g, _ = _gelu_parts(y.to(tl.float32) + b[None, :])
            tl.store(O + off, g.to(O.dtype.element_ty), mask=m)
            rows += RB

    # Each program takes ROWS rows of one BC-wide column block in tiles of RB, and writes one row of partial bias
    # gradients (accumulated as (RB, BC) tiles, reduced over rows once at the end). PREFETCH (offered to the autotuner
    # both ways): the next tile's loads are issued before this tile's GELU derivative and store, so that their latency
    # overlaps this tile's work (notes_speed.md #43: 0.767 -> 0.735 ms on an H200 with RB 2, ROWS 32, 4 warps; tiles
    # of 4 rows were the slowest with and without, and are no longer offered).
    @triton.autotune(configs=_configs(PREFETCH=[False, True], RB=[2], ROWS=[32, 64], num_warps=[4, 8]),
                     key=["n_cols"])
    @triton.jit(do_not_specialize=["n_rows"])
    def _bwd_kernel(DO, Y, B, DY, DBp, n_rows, n_cols, RB: tl.constexpr, ROWS: tl.constexpr, BC: tl.constexpr,
                    PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mc = cols < n_cols
        b = tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)
        acc = tl.zeros([RB, BC], dtype=tl.float32)
        rows = pid * ROWS + tl.arange(0, RB)
        end = tl.minimum(pid * ROWS + ROWS, n_rows)
        if PREFETCH:
            do_n, y_n = _pair(DO, Y, rows, rows < end, cols, mc, n_cols)
        for i in range(0, ROWS // RB):
            m = (rows < end)[:, None] & mc[None, :]
            off = rows[:, None] * n_cols + cols[None, :]  # int32: bias_gelu checks N * C < 2**31
            if PREFETCH:
                do, y = do_n, y_n
                do_n, y_n = _pair(DO, Y, rows + RB, rows + RB < end, cols, mc, n_cols)
            else:
                do, y = _pair(DO, Y, rows, rows < end, cols, mc, n_cols)
            _, d = _gelu_parts(y.to(tl.float32) + b[None, :])
            dy = do.to(tl.float32) * d  # masked: 0 * d
            tl.store(DY + off, dy.to(DY.dtype.element_ty), mask=m)
            acc += dy
            rows += RB
        tl.store(DBp + pid * n_cols + cols, tl.sum(acc, axis=0), mask=mc)


_BC = 1024  # columns per program (BERT-base's 3072 = 3 blocks; the tail block of other widths is masked)


def _bc(n_cols: int) -> int:
    return min(_BC, max(triton.next_power_of_2(n_cols), 16))


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bias):
        shape = y.shape
        y2 = y.reshape(-1, shape[-1]).contiguous()
        n, h = y2.shape
        out = torch.empty_like(y2)
        bc = _bc(h)
        if n:
            _fwd_kernel[lambda meta: (triton.cdiv(n, meta["ROWS"]), triton.cdiv(h, bc))](y2, bias, out, n, h, BC=bc)
        ctx.save_for_backward(y2, bias)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, do):
        y2, bias = ctx.saved_tensors
        n, h = y2.shape
        do2 = do.reshape(n, h).contiguous()
        dy = torch.empty_like(y2)
        bc = _bc(h)

        def launch(parts):  # the bias gradient: per-program partial column sums
            _bwd_kernel[lambda meta: (triton.cdiv(n, meta["ROWS"]), triton.cdiv(h, bc))](do2, y2, bias, dy, parts[0],
                                                                                          n, h, BC=bc)

        db = row_partial_sums(_bwd_kernel, n, h, 1, y2.device, launch)
        return dy.view(ctx.shape), db[0].to(bias.dtype)


_apply = torch.compiler.disable(_BiasGelu.apply)  # out of torch.compile graphs, as fused_norm's kernels


def bias_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact GELU of `y + bias` (y: (..., C), a Linear's output without its bias; bias: (C,)): one Triton kernel each
    way where `available(y.device)`, otherwise eager PyTorch. The result has y's dtype."""
    if tuple(bias.shape) != (y.shape[-1],):
        raise ValueError(f"bias_gelu: bias of shape {tuple(bias.shape)} for activations {tuple(y.shape)}")
    if available(y.device) and y.numel() <= _MAX_ELEMENTS:
        return _apply(y, bias)
    return eager_bias_gelu(y, bias)


def eager_bias_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same in eager PyTorch."""
    return F.gelu(y + bias.to(y.dtype))


def dense_gelu(dense: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`gelu(dense(x))` with the bias added in `bias_gelu` (BERT's intermediate layer, `hidden_act="gelu"`)."""
    return bias_gelu(F.linear(x, dense.weight), dense.bias)
