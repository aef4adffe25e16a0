"""BERT's feed-forward block with its bias + GELU in the GEMMs' epilogues (issue 6 goal 1, `pretrain.fused_ffn`).

The feed-forward block is `z = gelu(x W1^T + b1) W2^T` (H -> 4H -> H; the output layer's bias is added by the closing
LayerNorm kernel). Its (N, 4H) activations are the widest of the model. With `pretrain.fused_gelu` the two GEMMs are
cuBLAS's and one elementwise Triton kernel each way does the bias + GELU:

- forward: GEMM writes `y = x W1^T` (N x 4H); the kernel reads it, writes `gelu(y + b1)`;
- backward: GEMM writes `da = dz W2` (N x 4H); the kernel reads it and `y`, writes `dh = da * gelu'(y + b1)` and
  partial column sums for b1's gradient.

Those two kernels read / wrote ~3.8 GB per layer on BERT-base at seq 128 and took 17.4 ms of a ~160 ms H200 step
(notes_speed.md, session 10's profile). Here the two GEMMs that produce (N, 4H) tensors are Triton kernels that do that
work in their epilogue, on the fp32 accumulator while it is still in registers:

- forward `_mm_kernel` (EPI 0): `pre = x W1^T + b1` and `a = gelu(pre)`, both written (pre is kept for backward, as
  the bias + GELU path keeps `y`): one (N, 4H) read and one write less than GEMM + kernel;
- backward `_mm_kernel` (EPI 1): `dh = (dz W2) * gelu'(pre)`, reading `pre` in the epilogue, and each program's column
  sums of its dh tile (b1's gradient, summed by one small torch reduction): `da` is never written.

The other GEMMs stay cuBLAS's: `z = a W2^T`, the weight gradients `dz^T a` and `dh^T x`, and the input gradient
`dx = d_res + dh W1`, accumulated in place into the residual's gradient as `branch_linear.branch_in` does (the block's
input is returned as the sub-block's residual, so both of its gradients meet here).

Why our own GEMM kernels: cuBLASLt has GELU / dGELU + bias-gradient epilogues, but only for the tanh approximation of
GELU (BERT's `hidden_act="gelu"` is the exact erf one) and torch exposes only the forward one (`_addmm_activation`);
torch.compile's max-autotune Triton GEMM templates would fuse the epilogue, but the compiled encoder was slower here
(notes_speed.md #7, #28) and compiles for minutes. Tile sizes come from Triton's autotuner (a few seconds once per
width). Exact (erf) GELU in fp32 on the fp32 accumulator; inputs and outputs in the compute dtype (bf16 / fp16 only:
with fp32 Triton would run the dot products in TF32, so fp32 keeps the unfused path). Without Triton or a GPU the
packed encoder keeps its unfused path; the CPU tests run these kernels through Triton's interpreter
(tests/test_fused_norm.py).
"""
from __future__ import annotations

import os

import torch

from .fused_gelu import _gelu_parts
from .fused_norm import _MAX_ELEMENTS, available, row_partial_sums, triton

# (BM, BN, BK, warps, stages) offered to the autotuner on a GPU: wgmma-sized tiles for Hopper, two to four stages of
# shared-memory pipelining (<= 192 KB). Under the interpreter (CPU tests) one small tile; the tests launch others.
_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
          (128, 256, 64, 8, 4), (64, 256, 64, 4, 4), (128, 128, 128, 8, 3)]
_INTERPRETER_TILES = [(32, 32, 16, 4, 1)]


def _mm_configs() -> list:
    tiles = _INTERPRETER_TILES if os.environ.get("TRITON_INTERPRET") == "1" else _TILES
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]


if triton is not None:
    import triton.language as tl

    # One program per (BM, BN) tile of C = A B (A: (m, k) row-major; B: (k, n) with strides s_bk, s_bn, so W1^T is W1
    # read with its strides swapped). Programs run row block by row block (the n tiles of one row block are
    # neighbours): each A row block is read from HBM once and from L2 by the others; B (the weight) stays in L2.
    # Rows past m and columns past n are clamped for the loads (valid addresses, results masked at the store).
    @triton.autotune(configs=_mm_configs(), key=["n", "k", "EPI"])
    @triton.heuristics({"EVEN_K": lambda args: args["k"] % args["BK"] == 0})
    @triton.jit(do_not_specialize=["m"])
    def _mm_kernel(A, B, BIAS, PRE, OUT, DBP, m, n, k, s_bk, s_bn,
                   EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(n, BN)
        pid_m, pid_n = pid // tiles_n, pid % tiles_n
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptr = A + tl.where(rm < m, rm, 0)[:, None] * k + rk[None, :]  # int32: fused_ffn checks m * n, m * k < 2**31
        b_ptr = B + rk[:, None] * s_bk + tl.where(rn < n, rn, 0)[None, :] * s_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, tl.cdiv(k, BK)):
            if EVEN_K:
                a, b = tl.load(a_ptr), tl.load(b_ptr)
            else:
                kin = kk * BK + rk < k
                a = tl.load(a_ptr, mask=kin[None, :], other=0.0)
                b = tl.load(b_ptr, mask=kin[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptr += BK
            b_ptr += BK * s_bk
        mn = rn < n
        mask = (rm < m)[:, None] & mn[None, :]
        off = rm[:, None] * n + rn[None, :]
        if EPI == 0:  # forward: pre = acc + b1, a = gelu(pre)
            v = acc + tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            g, _ = _gelu_parts(v)
            tl.store(PRE + off, v.to(PRE.dtype.element_ty), mask=mask)
            tl.store(OUT + off, g.to(OUT.dtype.element_ty), mask=mask)
        else:  # backward: dh = acc * gelu'(pre), and this tile's column sums of dh (b1's gradient)
            _, d = _gelu_parts(tl.load(PRE + off, mask=mask, other=0.0).to(tl.float32))
            dh = tl.where(mask, acc * d, 0.0)  # clamped rows / columns hold real products: zeroed for the sums
            tl.store(OUT + off, dh.to(OUT.dtype.element_ty), mask=mask)
            tl.store(DBP + pid_m * n + rn, tl.sum(dh, axis=0), mask=mn)


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)


def mm_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, a): `pre = x w1^T + b1` and `a = gelu(pre)` (x: (m, k), w1: (n, k), both contiguous, one dtype), from
    one Triton GEMM with the bias + exact GELU in its epilogue."""
    m, k = x.shape
    n = w1.shape[0]
    pre, a = (torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in range(2))
    if m:
        _mm_kernel[_grid(m, n)](x, w1, b1, pre, a, a, m, n, k, 1, k, EPI=0)
    return pre, a


def mm_dgelu(dz: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, db1): `dh = (dz w2) * gelu'(pre)` (dz: (m, k), w2: (k, n), pre: (m, n), contiguous) from one Triton GEMM
    with the GELU derivative in its epilogue, and dh's column sums (fp32)."""
    m, k = dz.shape
    n = w2.shape[1]
    dh = torch.empty(m, n, dtype=dz.dtype, device=dz.device)

    def launch(parts):  # each program writes its tile's column sums into row pid_m of parts[0]
        _mm_kernel[_grid(m, n)](dz, w2, dz, pre, dh, parts[0], m, n, k, n, 1, EPI=1)

    db = row_partial_sums(_mm_kernel, m, n, 1, dz.device, launch, rows_key="BM")
    return dh, db[0]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _FusedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2):
        dt = _compute_dtype(x)
        shape = x.shape
        x2 = x.to(dt).reshape(-1, shape[-1]).contiguous()
        w1c, w2c = w1.to(dt).contiguous(), w2.to(dt).contiguous()
        pre, a = mm_gelu(x2, w1c, b1)
        with torch.autocast(x.device.type, enabled=False):
            z = torch.mm(a, w2c.t())
        ctx.save_for_backward(x2, w1c, w2c, pre, a)
        ctx.dtypes = x.dtype, w1.dtype, b1.dtype, w2.dtype
        ctx.shape = shape
        return z.view(*shape[:-1], w2.shape[0]), x

    @staticmethod
    def backward(ctx, dz, d_res):
        x2, w1c, w2c, pre, a = ctx.saved_tensors
        x_dt, w1_dt, b1_dt, w2_dt = ctx.dtypes
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad
        dx = dw1 = db1 = dw2 = None
        h = x2.shape[1]
        if dz is not None:
            dz2 = dz.reshape(-1, dz.shape[-1]).to(x2.dtype).contiguous()
            dh, db = mm_dgelu(dz2, w2c, pre)
            if need_w2:
                dw2 = torch.mm(dz2.t(), a).to(w2_dt)
            if need_w1:
                dw1 = torch.mm(dh.t(), x2).to(w1_dt)
            if need_b1:
                db1 = db.to(b1_dt)
            if need_x:  # the residual's gradient accumulated in the GEMM's epilogue where it can be (branch_linear)
                if d_res is not None and d_res.dtype == x2.dtype and d_res.is_contiguous():
                    dx = d_res.view(-1, h).addmm_(dh, w1c).view(ctx.shape)
                else:
                    dx = torch.mm(dh, w1c).view(ctx.shape).to(x_dt)
                    dx = dx if d_res is None else dx + d_res
        elif need_x:
            dx = d_res
        return dx, dw1, db1, dw2


_apply = torch.compiler.disable(_FusedFFN.apply)  # out of torch.compile graphs, as the other fused kernels


def runs_on(x: torch.Tensor) -> bool:
    """Whether `fused_ffn` runs its kernels for activations like `x` (under autocast, in its dtype): fp16 / bf16 on a
    CUDA device, or anything under Triton's interpreter (the CPU tests)."""
    if not available(x.device):
        return False
    return x.device.type != "cuda" or _compute_dtype(x) in (torch.float16, torch.bfloat16)


def fused_ffn(x: torch.Tensor, intermediate: torch.nn.Linear, output: torch.nn.Linear
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gelu(intermediate(x)) output.weight^T, x)`: BERT's feed-forward block without the output layer's bias (the
    closing LayerNorm kernel adds it), and `x` itself to be used as the sub-block's residual (and nowhere else), so
    backward sums both of its gradients in one GEMM. Needs `runs_on(x)`; under autocast the GEMMs run in its dtype."""
    w1, b1, w2 = intermediate.weight, intermediate.bias, output.weight
    n_in, n_mid = w1.shape[1], w1.shape[0]
    if x.shape[-1] != n_in or tuple(w2.shape) != (n_in, n_mid) or b1 is None or tuple(b1.shape) != (n_mid,):
        raise ValueError(f"fused_ffn: input {tuple(x.shape)}, intermediate weight {tuple(w1.shape)}, bias "
                         f"{None if b1 is None else tuple(b1.shape)}, output weight {tuple(w2.shape)}")
    if not runs_on(x):
        raise ValueError(f"fused_ffn: no kernels for {x.dtype} on {x.device} (fp16 / bf16 on a CUDA device with Triton)")
    m = x.numel() // n_in
    if m * max(n_mid, n_in) > _MAX_ELEMENTS:
        raise ValueError(f"fused_ffn: {m} rows x {n_mid} columns exceed int32 offsets; split the batch")
    return _apply(x, w1, b1, w2)
