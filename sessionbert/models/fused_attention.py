"""Attention within each session of a packed stream, for short sessions (issue 6 goal 1, `pretrain.fused_attention`).

The packed encoder attends within each session of a (N,) token stream (`models.packed.varlen_attention`). PyTorch's
variable-length FlashAttention-2 kernel took ~25 ms of a ~165 ms BERT-base step at seq 128 on an H200 (20 ms of it
backward): 2.5 ms per layer forward + backward, where the layer's attention moves ~1.6 GB (q, k, v, o, do read; dq, dk,
dv written: ~0.5 ms at the H200's bandwidth). FA2's backward is written for long sequences: it splits each sequence's
keys into blocks, accumulates dq with fp32 atomics into a scratch buffer and converts it in a second kernel, after a
third that computes rowsum(do * o). A session of at most 128 tokens is one key block, so here:

- forward: one program per (session, query block, head), online softmax over the session's key blocks; writes the
  output and the per-row log-sum-exp (base 2);
- backward: one program per (session, 128-key block, head) holds that block's k, v and their gradients in registers
  and loops over the session's query blocks (rowsum(do * o) computed as it loads them), with the scores transposed
  (keys x queries) so that P^T and dS^T feed the dv and dk products without a transpose. When the session is one key
  block, the dq it computes is complete and it writes it: one kernel, no atomics, no scratch. Sessions longer than one
  key block (seq 512) get their dq from a second kernel per (session, query block, head) that loops over the key
  blocks (as FlashAttention's Triton tutorial does), so any length works;
- `bias_grads`: the packed encoder's Q / K / V projections add their biases detached, and the backward kernels write
  per-program column sums of the dq / dk / dv tiles they hold (one small reduction adds them up): the three bias
  gradients without three passes over (N, 768) gradients (~0.28 ms per layer; the sums cost ~0.12 ms in the kernels).
- `q_rows` (`models.packed.QueryRows`, the MLM's masked positions in the last layer): a subset of positions are the
  queries. The kernels read those rows of q where they are and write dq there (HAS_QROWS, a constexpr: the full
  attention compiles as before), the output is compact. Measured in the step: +0.44% at seq 128 in one A/B pair
  (notes_speed.md #54).

Measured on one H200 (experiments/results/fused_kernels_dev/s10_call4_attention_dbias/): forward + backward per layer
1.55 ms against varlen's 2.50 at seq 128 (sessions of 102 tokens on average), 2.69 against 3.80 at seq 512; in the
BERT-base step +5.2% / +4.6% real tokens/s (results/bench_gpu_attention.md). Tile sizes come from Triton's autotuner.

Why our own kernel: the faster attention kernels (FlashAttention 3 / 4, cuDNN's) are not in the torch build our GPUs
have, and the ones that are were measured slower at these lengths (notes_speed.md #27: NJT, SDPA buckets, cuDNN,
flex_attention with a document mask). Without Triton or a GPU, `models.packed.varlen_attention` runs torch's path; the
CPU tests run these kernels through Triton's interpreter (tests/test_fused_norm.py), on the GPU
experiments/device/attention_check.py compares them and varlen with fp32.

No attention-probability dropout (as the varlen kernel; the packed encoder refuses it while training).
"""
from __future__ import annotations

import math

import torch

from .fused_norm import _configs, available, triton

BLOCK_N_BWD = 128  # keys per backward program: a session up to this long gets dq from the same kernel
MIN_BLOCK_N_BWD = 32  # fewer keys per backward program when every session is this short or shorter (_bwd_block_n)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _load(X, rows, mask, h, stride, offs_d, HEAD_DIM: tl.constexpr):
        """Head h of rows `rows` of X, zeros where ~mask."""
        return tl.load(X + rows[:, None] * stride + h * HEAD_DIM + offs_d[None, :], mask=mask[:, None], other=0.0)

    @triton.jit
    def _store(X, x, rows, mask, h, stride, offs_d, HEAD_DIM: tl.constexpr):
        """`x` as head h of rows `rows` of X (where mask), in X's dtype."""
        tl.store(X + rows[:, None] * stride + h * HEAD_DIM + offs_d[None, :], x.to(X.dtype.element_ty),
                 mask=mask[:, None])

    @triton.jit
    def _q_rows(QROWS, rows, mask, HAS_QROWS: tl.constexpr):
        """Rows of Q / DQ for compact query indices `rows`: QROWS[rows] (a subset of the stream's positions), or
        `rows` themselves (every position a query)."""
        if HAS_QROWS:
            return tl.load(QROWS + rows, mask=mask, other=0)
        return rows

    # session 10's calls picked 64 x 64 tiles, 4 warps, among BLOCK_M / BLOCK_N 32 / 64 / 128 and 2 / 4 / 8 warps
    # BLOCK_M 16 for the few queries per session of a query subset (`q_rows`: the masked positions, ~15%)
    @triton.autotune(configs=_configs(BLOCK_M=[64, 32, 16], BLOCK_N=[64], num_warps=[4, 2]),
                     key=["HEAD_DIM", "len_bucket", "HAS_QROWS"])
    @triton.jit(do_not_specialize=["n_q"])
    def _attn_fwd(Q, K, V, O, LSE, CU, CUQ, QROWS, sq, sk, sv, so, qk_scale, n_q, len_bucket,
                  HAS_QROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """O, LSE of one query block of a session; HAS_QROWS: the session's queries are the Q rows QROWS[CUQ[doc]:
        CUQ[doc + 1]] (O, LSE in that compact order), else every position of the session (CUQ = CU)."""
        doc, mb, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(CU + doc)
        length = tl.load(CU + doc + 1) - start
        qstart = tl.load(CUQ + doc)
        qlength = tl.load(CUQ + doc + 1) - qstart
        if mb * BLOCK_M < qlength:
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM)
            mask_m = offs_m < qlength
            rows = (qstart + offs_m).to(tl.int64)  # compact query index (O, LSE)
            q = _load(Q, _q_rows(QROWS, rows, mask_m, HAS_QROWS), mask_m, h, sq, offs_d, HEAD_DIM)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            for n0 in range(0, length, BLOCK_N):  # every block holds a key of the session: row maxima stay finite
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < length
                cols = (start + offs_n).to(tl.int64)
                k = _load(K, cols, mask_n, h, sk, offs_d, HEAD_DIM)
                v = _load(V, cols, mask_n, h, sv, offs_d, HEAD_DIM)
                s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
                s = tl.where(mask_n[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.math.exp2(s - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
            acc = acc / l_i[:, None]
            _store(O, acc, rows, mask_m, h, so, offs_d, HEAD_DIM)
            tl.store(LSE + h.to(tl.int64) * n_q + rows, m_i + tl.math.log2(l_i), mask=mask_m)

    @triton.jit
    def _delta(O, DO, rows, mask_m, h, so, sdo, offs_d, HEAD_DIM: tl.constexpr):
        """rowsum(do * o) in fp32 for rows `rows` of head h, and do."""
        do = _load(DO, rows, mask_m, h, sdo, offs_d, HEAD_DIM)
        o = _load(O, rows, mask_m, h, so, offs_d, HEAD_DIM)
        return tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), do

    # the autotuner picked the smallest BLOCK_M offered in session 10's calls (32, then 16 when offered; 4 warps), and
    # 4 pipeline stages of the 1-4 offered in session 11 (1.664 vs 1.705 ms per layer at seq 128 with 3; no step-level
    # difference measurable: notes_speed.md #43)
    @triton.autotune(configs=_configs(BLOCK_M=[16, 32], num_warps=[4, 2, 8], num_stages=[3, 4]),
                     key=["HEAD_DIM", "len_bucket", "HAS_QROWS", "HAS_DB"])
    @triton.jit(do_not_specialize=["n_q"])
    def _attn_bwd_kv(Q, K, V, O, DO, DQ, DK, DV, DB, LSE, CU, CUQ, QROWS, sq, sk, sv, so, sdo, sdq, sdk, sdv,
                     qk_scale, sm_scale, n_q, len_bucket, HAS_QROWS: tl.constexpr, HAS_DB: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dk, dv of one key block; dq too when the session is one key block. HAS_DB: the program's column sums of
        dq (one-block sessions), dk, dv (the Q / K / V biases' gradients) to row (doc, key block) of the
        (B * blocks, 3, heads * HEAD_DIM) DB. Queries as in _attn_fwd (HAS_QROWS: dq to rows QROWS[...] of DQ)."""
        doc, nb, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(CU + doc)
        length = tl.load(CU + doc + 1) - start
        qstart = tl.load(CUQ + doc)
        qlength = tl.load(CUQ + doc + 1) - qstart
        if nb * BLOCK_N < length:
            one_block = length <= BLOCK_N
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, HEAD_DIM)
            mask_n = offs_n < length
            cols = (start + offs_n).to(tl.int64)
            k = _load(K, cols, mask_n, h, sk, offs_d, HEAD_DIM)
            v = _load(V, cols, mask_n, h, sv, offs_d, HEAD_DIM)
            dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
            dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
            dq_sum = tl.zeros([HEAD_DIM], tl.float32)
            for m0 in range(0, qlength, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                mask_m = offs_m < qlength
                rows = (qstart + offs_m).to(tl.int64)  # compact query index (O, DO, LSE)
                qrows = _q_rows(QROWS, rows, mask_m, HAS_QROWS)  # rows of Q, DQ
                q = _load(Q, qrows, mask_m, h, sq, offs_d, HEAD_DIM)
                lse = tl.load(LSE + h.to(tl.int64) * n_q + rows, mask=mask_m, other=0.0)
                di, do = _delta(O, DO, rows, mask_m, h, so, sdo, offs_d, HEAD_DIM)
                # Transposed (keys x queries) scores, as FlashAttention's Triton backward: P^T and dS^T are the
                # register operands of the dv and dk products without a transpose (measured: 1.63 against 1.87 ms
                # per layer at seq 128). Queries past the session have q = do = 0: p finite, and they add nothing to
                # dv, dk (dp = di = 0).
                pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
                pt = tl.where(mask_n[:, None], pt, 0.0)
                dv += tl.dot(pt.to(do.dtype), do)
                dst = pt * (tl.dot(v, tl.trans(do)) - di[None, :])
                dk += tl.dot(dst.to(q.dtype), q)
                if one_block:
                    dq = tl.dot(tl.trans(dst.to(k.dtype)), k) * sm_scale
                    _store(DQ, dq, qrows, mask_m, h, sdq, offs_d, HEAD_DIM)
                    if HAS_DB:  # rows past the session hold zeros
                        dq_sum += tl.sum(dq, 0)
            dk = dk * sm_scale
            _store(DK, dk, cols, mask_n, h, sdk, offs_d, HEAD_DIM)
            _store(DV, dv, cols, mask_n, h, sdv, offs_d, HEAD_DIM)
            if HAS_DB:  # rows past the session hold zeros in dk, dv
                width = tl.num_programs(2) * HEAD_DIM
                db = DB + (doc * tl.num_programs(1) + nb).to(tl.int64) * 3 * width + h * HEAD_DIM + offs_d
                tl.store(db, dq_sum)
                tl.store(db + width, tl.sum(dk, 0))
                tl.store(db + 2 * width, tl.sum(dv, 0))

    # reset_to_zero: the configs lay DBQ's rows out by their own BLOCK_M; the autotuning call keeps the last one's
    @triton.autotune(configs=_configs(BLOCK_M=[64, 32, 128], num_warps=[4, 8]),
                     key=["HEAD_DIM", "len_bucket", "HAS_QROWS", "HAS_DB"], reset_to_zero=["DBQ"])
    @triton.jit(do_not_specialize=["n_q"])
    def _attn_bwd_q(Q, K, V, O, DO, DQ, DBQ, LSE, CU, CUQ, QROWS, sq, sk, sv, so, sdo, sdq, qk_scale, sm_scale, n_q,
                    len_bucket, HAS_QROWS: tl.constexpr, HAS_DB: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dq of one query block of a session longer than one key block (shorter ones: _attn_bwd_kv); HAS_DB: its
        column sums to row (doc, query block) of the (B * blocks, heads * HEAD_DIM) DBQ. Queries as in _attn_fwd."""
        doc, mb, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(CU + doc)
        length = tl.load(CU + doc + 1) - start
        qstart = tl.load(CUQ + doc)
        qlength = tl.load(CUQ + doc + 1) - qstart
        if (length > BLOCK_N) & (mb * BLOCK_M < qlength):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM)
            mask_m = offs_m < qlength
            rows = (qstart + offs_m).to(tl.int64)  # compact query index (O, DO, LSE)
            qrows = _q_rows(QROWS, rows, mask_m, HAS_QROWS)  # rows of Q, DQ
            q = _load(Q, qrows, mask_m, h, sq, offs_d, HEAD_DIM)
            lse = tl.load(LSE + h.to(tl.int64) * n_q + rows, mask=mask_m, other=0.0)
            di, do = _delta(O, DO, rows, mask_m, h, so, sdo, offs_d, HEAD_DIM)
            dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            for n0 in range(0, length, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < length
                cols = (start + offs_n).to(tl.int64)
                k = _load(K, cols, mask_n, h, sk, offs_d, HEAD_DIM)
                v = _load(V, cols, mask_n, h, sv, offs_d, HEAD_DIM)
                p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
                p = tl.where(mask_n[None, :], p, 0.0)
                ds = p * (tl.dot(do, tl.trans(v)) - di[:, None])
                dq += tl.dot(ds.to(k.dtype), k)
            dq = dq * sm_scale
            _store(DQ, dq, qrows, mask_m, h, sdq, offs_d, HEAD_DIM)
            if HAS_DB:  # rows past the session hold zeros
                width = tl.num_programs(2) * HEAD_DIM
                tl.store(DBQ + (doc * tl.num_programs(1) + mb).to(tl.int64) * width + h * HEAD_DIM + offs_d,
                         tl.sum(dq, 0))


def runs_on(x: torch.Tensor) -> bool:
    """Whether `attention` runs its kernels for tensors like `x`: fp16 / bf16 on a CUDA device (as torch's varlen
    kernel: fp32 there would silently run the dot products in TF32), any dtype under Triton's interpreter."""
    if not available(x.device):
        return False
    return x.device.type != "cuda" or x.dtype in (torch.float16, torch.bfloat16)


def _len_bucket(max_len: int) -> int:
    """Autotuning key: the longest session rounded up to a power of two (one tuning per seq_len, not per batch)."""
    return 1 << max(0, int(max_len) - 1).bit_length()


def _bwd_block_n(max_len: int) -> int:
    """Keys per backward program: BLOCK_N_BWD, or the length bucket when every session is shorter (down to
    MIN_BLOCK_N_BWD). Either way such sessions are one key block (same grid, one-kernel dq); the smaller block
    skips the masked key rows' dot products (half of each program at seq_len 64, the paper scale's; notes_speed.md
    #49)."""
    return min(BLOCK_N_BWD, max(MIN_BLOCK_N_BWD, _len_bucket(max_len)))


def _check(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want three equal "
                         f"(N, heads, head_dim)")
    if any(t.stride(2) != 1 or t.stride(1) != q.shape[2] for t in (q, k, v)):
        raise ValueError("attention: q, k, v need contiguous heads (strides (any, head_dim, 1)), as views of a "
                         "(N, heads * head_dim) projection have")
    d = q.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"attention: head_dim {d} must be a power of two >= 16 for the Triton kernels")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"attention: cu_seqlens {tuple(cu_seqlens.shape)} must be (sessions + 1,)")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int, scale: float, q_index, cu_q, max_len_q: int, *bias_params):
        n, heads, d = q.shape
        cu = cu_seqlens.to(torch.int32)
        has_q = q_index is not None
        cuq = cu_q.to(torch.int32) if has_q else cu
        qrows = q_index if has_q else cu  # (a pointer the kernels never read without HAS_QROWS)
        n_q = len(q_index) if has_q else n
        max_q = max_len_q if has_q else max_len
        o = torch.empty(n_q, heads, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(heads, n_q, dtype=torch.float32, device=q.device)
        b, bucket = cu.numel() - 1, _len_bucket(max_len)
        if n_q and b:
            _attn_fwd[lambda meta: (b, triton.cdiv(max_q, meta["BLOCK_M"]), heads)](
                q, k, v, o, lse, cu, cuq, qrows, q.stride(0), k.stride(0), v.stride(0), o.stride(0),
                scale * math.log2(math.e), n_q, bucket, HAS_QROWS=has_q, HEAD_DIM=d)
        ctx.save_for_backward(q, k, v, o, lse, cu, cuq, qrows)
        ctx.max_len, ctx.max_q, ctx.scale, ctx.has_q = max_len, max_q, scale, has_q
        ctx.bias_dtypes = [p.dtype for p in bias_params]  # only their gradients are made here (the column sums)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, cuq, qrows = ctx.saved_tensors
        n, heads, d = q.shape
        n_q = o.shape[0]
        max_len, max_q, scale, has_q, has_db = ctx.max_len, ctx.max_q, ctx.scale, ctx.has_q, bool(ctx.bias_dtypes)
        do = do if do.stride(2) == 1 and do.stride(1) == d else do.contiguous()
        # dq, dk, dv as column slices of one (N, 3 * heads * d) buffer: a backward that runs the three projections
        # as one GEMM (`branch_linear.branch_in`) then takes them as one matrix, with no copy (notes_speed.md #45)
        dq, dk, dv = torch.empty(n, 3, heads, d, dtype=q.dtype, device=q.device).unbind(1)
        if has_q:  # the kernels write dq on the query rows only; the other positions were no query
            dq.zero_()
        b, bucket = cu.numel() - 1, _len_bucket(max_len)
        block_n = _bwd_block_n(max_len)
        blocks, long = -(-max_len // block_n), max_len > block_n
        # per-program column sums of dq / dk / dv (the biases' gradients), added up below; idle programs leave zeros
        db = torch.zeros(b * blocks if has_db else 1, 3, heads * d, dtype=torch.float32, device=q.device)
        min_bm = min(c.kwargs["BLOCK_M"] for c in _attn_bwd_q.configs)  # rows for its smallest query block
        dbq = torch.zeros(b * -(-max_q // min_bm) if has_db and long else 1, heads * d, dtype=torch.float32,
                          device=q.device)
        if n and b:
            args = (scale * math.log2(math.e), scale, n_q, bucket)
            if n_q:
                _attn_bwd_kv[(b, blocks, heads)](
                    q, k, v, o, do, dq, dk, dv, db, lse, cu, cuq, qrows, q.stride(0), k.stride(0), v.stride(0),
                    o.stride(0), do.stride(0), dq.stride(0), dk.stride(0), dv.stride(0), *args, HAS_QROWS=has_q,
                    HAS_DB=has_db, HEAD_DIM=d, BLOCK_N=block_n)
            else:  # no query: nothing reaches the keys and values
                dk.zero_()
                dv.zero_()
            if long and n_q:
                _attn_bwd_q[lambda meta: (b, triton.cdiv(max_q, meta["BLOCK_M"]), heads)](
                    q, k, v, o, do, dq, dbq, lse, cu, cuq, qrows, q.stride(0), k.stride(0), v.stride(0), o.stride(0),
                    do.stride(0), dq.stride(0), *args, HAS_QROWS=has_q, HAS_DB=has_db, HEAD_DIM=d, BLOCK_N=block_n)
        dbias = ()
        if has_db:
            sums = db.sum(0)
            sums[0] += dbq.sum(0)
            dbias = tuple(sums[i].to(dt) for i, dt in enumerate(ctx.bias_dtypes))
        return dq, dk, dv, None, None, None, None, None, None, *dbias


_apply = torch.compiler.disable(_Attention.apply)  # out of torch.compile graphs, as fused_norm's kernels


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
              scale: float | None = None, bias_grads: tuple | None = None, q_rows=None) -> torch.Tensor:
    """(N, heads, d) packed q / k / v -> (N, heads, d): softmax(q k^T * scale) v within each session of the stream
    (sessions are cu_seqlens[i]:cu_seqlens[i+1], every position in one; max_len >= the longest). Triton kernels where
    `runs_on(q)` (`models.packed.varlen_attention` checks it and otherwise runs its own path).

    `bias_grads`: the Q / K / V projections' (heads * d,) bias parameters, when the projections added them detached:
    their gradients (the column sums of dq, dk, dv) are summed by the backward kernels from the tiles they hold, so no
    pass of their own over the (N, heads * d) gradients. Not used in the forward.

    `q_rows` (`models.packed.QueryRows`): only these positions are queries (the MLM's masked rows): the output is
    (q_rows.n, heads, d), row j the attention of position q_rows.index[j] over its whole session. The kernels read
    those rows of q in place and write dq there (zeros elsewhere), so the Q / K / V backward still takes dq, dk, dv as
    one matrix."""
    _check(q, k, v, cu_seqlens)
    q_index = cu_q = None
    max_q = 0
    if q_rows is not None:
        q_index, cu_q, max_q = q_rows.index[: q_rows.n], q_rows.cu_seqlens, int(q_rows.max_len)
        if cu_q.shape != cu_seqlens.shape:
            raise ValueError(f"attention: q_rows.cu_seqlens {tuple(cu_q.shape)} must match cu_seqlens "
                             f"{tuple(cu_seqlens.shape)} (one query range per session)")
    if bias_grads is not None and (len(bias_grads) != 3 or
                                   any(t.shape != (q.shape[1] * q.shape[2],) for t in bias_grads)):
        raise ValueError(f"attention: bias_grads must be three ({q.shape[1] * q.shape[2]},) tensors")
    if not runs_on(q):
        raise RuntimeError(f"attention: the Triton kernels need fp16 / bf16 on a CUDA device (or TRITON_INTERPRET=1), "
                           f"got {q.dtype} on {q.device}")
    return _apply(q, k, v, cu_seqlens, int(max_len), float(q.shape[2] ** -0.5 if scale is None else scale),
                  q_index, cu_q, max_q, *(bias_grads or ()))
