"""MLM cross-entropy over the decoder's logits in one Triton kernel each way (issue 6 goal 1, `pretrain.fused_ce`).

The MLM loss is `cross_entropy(logits.float(), labels)` over the masked positions' (M, V) logits (M ~ 19k positions
of a 131072-token step, V = 30000: ~560M logits, 1.1 GB in bf16). In eager PyTorch that is a chain of full passes
over them: the cast to fp32 (2.2 GB written), log_softmax (read and write 2.2 GB), its backward (reads two, writes
one fp32 tensor), the cast of the gradient back to bf16: ~20 GB of memory traffic, ~6 ms of an H200 step. Here:

- forward: one program per row reads the row once (fp32 arithmetic on the bf16 values, exactly what `.float()`
  gives), keeps a running max and rescaled sum of exponentials, and writes the row's loss and log-sum-exp;
- backward: reads the logits once more and writes their gradient in the logits' dtype,
  `(softmax - onehot(label)) * dloss / count`: 1.1 GB read and 1.1 GB written, nothing in fp32.

`ignore_index` rows (the packed collator's filler rows) contribute nothing and are not counted, as in
`F.cross_entropy(..., reduction="mean")`; with no counted row the loss is NaN, as there. A label outside [0, V) that
is not `ignore_index` fails a device-side assert (`torch._assert_async`: no host sync), as F.cross_entropy's CUDA kernel
does; the kernel never reads outside the row.

Why our own kernel: the fused cross-entropies in the field (Apex's xentropy, flash-attn's and Liger's Triton
kernels) are not in our dependency set; torch.compile fuses the chain but recompiles for each masked-position count.
Without Triton or a GPU, `cross_entropy` is `F.cross_entropy(logits.float(), ...)` (the CPU tests also run the
kernels through Triton's interpreter, tests/test_fused_norm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_norm import _configs, available, triton

if triton is not None:
    import triton.language as tl

    @triton.autotune(configs=_configs(BLOCK=[4096, 2048], num_warps=[8, 4]), key=["n_cols"])
    @triton.jit(do_not_specialize=["ignore"])
    def _fwd_kernel(L, Y, Loss, Lse, n_cols, stride, ignore, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = L + row.to(tl.int64) * stride
        cols = tl.arange(0, BLOCK)
        m = float("-inf")  # running max and sum of exp(x - m) over the columns read so far
        s = 0.0
        for start in range(0, n_cols, BLOCK):  # every block has at least one column: its max is finite
            c = start + cols
            x = tl.load(base + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        y = tl.load(Y + row)
        ok = y != ignore
        xt = tl.load(base + y, mask=ok & (y >= 0) & (y < n_cols), other=0.0).to(tl.float32)
        tl.store(Loss + row, tl.where(ok, lse - xt, 0.0))
        tl.store(Lse + row, lse)

    # (rows, column blocks): the gradient of one block of one row; Scale holds dloss / count (0 for ignored rows)
    @triton.autotune(configs=_configs(BLOCK=[4096, 2048], num_warps=[8, 4]), key=["n_cols"])
    @triton.jit
    def _bwd_kernel(L, Y, Lse, Scale, DL, n_cols, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mc = c < n_cols
        off = row.to(tl.int64) * stride
        x = tl.load(L + off + c, mask=mc, other=0.0).to(tl.float32)
        d = tl.exp(x - tl.load(Lse + row)) - tl.where(c == tl.load(Y + row), 1.0, 0.0)
        tl.store(DL + off + c, (d * tl.load(Scale + row)).to(DL.dtype.element_ty), mask=mc)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int):
        logits = logits.contiguous()
        m, v = logits.shape
        loss = torch.empty(m, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        if m:
            _fwd_kernel[(m,)](logits, labels, loss, lse, v, logits.stride(0), ignore_index)
        valid = labels != ignore_index
        torch._assert_async(((labels >= 0) & (labels < v) | ~valid).all(),
                            f"cross_entropy: a label outside [0, {v}) that is not ignore_index {ignore_index}")
        count = valid.sum()
        ctx.save_for_backward(logits, labels, lse, valid, count)
        return loss.sum() / count

    @staticmethod
    def backward(ctx, g):
        logits, labels, lse, valid, count = ctx.saved_tensors
        m, v = logits.shape
        scale = (g.float() / count) * valid  # (M,): no host sync
        dl = torch.empty_like(logits)
        if m:
            _bwd_kernel[lambda meta: (m, triton.cdiv(v, meta["BLOCK"]))](logits, labels, lse, scale, dl, v,
                                                                          logits.stride(0))
        return dl, None, None


_apply = torch.compiler.disable(_CrossEntropy.apply)  # out of torch.compile graphs, as fused_norm's kernels


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (M, V) `logits` against (M,) `labels`, rows labelled `ignore_index` left out: one Triton
    kernel each way where `available(logits.device)`, otherwise `F.cross_entropy(logits.float(), ...)`. fp32 result;
    the logits' gradient in their dtype."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: want (M, V) "
                         f"and (M,)")
    if available(logits.device):
        return _apply(logits, labels, int(ignore_index))
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
