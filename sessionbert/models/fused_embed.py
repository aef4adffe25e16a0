"""BERT's embeddings over a packed stream as one Triton kernel each way (issue 6 goal 1, with `pretrain.fused_norm`).

`BertEmbeddings` sums three fp32 lookups (word, position, token type), normalises the sum (LayerNorm) and applies
dropout; the packed encoder then casts the (N, 768) result to bf16. In eager PyTorch that is a chain of full fp32
passes forward (three gathers, two adds, LayerNorm, dropout with its mask, the cast: ~6.7 GB for a 131k-token step)
and backward (the cast, dropout's mask product, LayerNorm's backward, and one `embedding_dense_backward` per table,
which sorts the indices first). Here:

- forward: one kernel gathers the word and position rows, adds the token-type row, normalises, applies dropout and
  writes the activations' dtype; it keeps only the per-row mean / reciprocal std (the sum is gathered again in
  backward, a read of two rows, instead of keeping an (N, H) fp32 copy);
- backward: one kernel drops the same positions again, runs LayerNorm's backward and writes the (N, H) fp32 gradient of
  the sum, with per-program partial sums of the LayerNorm weight / bias gradients and of the token-type row's
  gradient; `nn.Embedding`'s own backward op (`embedding_dense_backward`: sorted segment sums, deterministic) scatters
  that gradient into the word and position tables.

Measured on one H200 (experiments/results/fused_kernels_dev/s12_call1_embed/, 131,072 rows x 768, dropout 0.1):
forward 1.76 -> 0.37 ms, forward + backward 4.63 -> 2.41 ms; the BERT-base step at seq 128 801.9k -> 809.6k real
tokens/s in one call (results/bench_gpu_embed.md). With `embedding_dense_backward` for the tables instead of
`index_add_` (session 13, fused_kernels_dev/s13_call2_micro/): forward + backward 2.28 -> 1.90 ms.

Why our own kernel: as for `fused_norm` (whose dropout generator and helpers it shares), no library in our dependency
set fuses the lookups with LayerNorm and dropout, and the packed encoder with every switch runs eager (torch.compile's
step was slower, notes_speed.md #28). Triton ships with every CUDA build of torch.

Same maths as `BertEmbeddings` with token type 0 everywhere (what the packed encoder passes), up to rounding; the
padding row of the word table gets no gradient, as `nn.Embedding(padding_idx=...)`. Dropout draws come from
`fused_norm`'s counter-based generator, not torch's. Out-of-range ids fail on the device as `F.embedding` does
(`torch._assert_async`: no host sync). Where Triton or a GPU is missing, `embed` is `BertEmbeddings` itself (the CPU
tests also run the kernels through Triton's interpreter, tests/test_fused_embed.py).
"""
from __future__ import annotations

import torch

from .fused_norm import (_MAX_ELEMENTS, _block, _configs, _keep, _normalise, _normalise_grad, _tile, available,
                         row_partial_sums, triton)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sum_rows(IDS, POS, WE, PE, te, rows, ok, cols, mc, n_cols):
        """word[ids] + position[pos] + te for `rows` (those with `ok`) in fp32, zeros elsewhere."""
        ids = tl.load(IDS + rows, mask=ok, other=0).to(tl.int64)
        pos = tl.load(POS + rows, mask=ok, other=0).to(tl.int64)
        m = ok[:, None] & mc[None, :]
        e = tl.load(WE + ids[:, None] * n_cols + cols[None, :], mask=m, other=0.0).to(tl.float32)
        e += tl.load(PE + pos[:, None] * n_cols + cols[None, :], mask=m, other=0.0).to(tl.float32)
        return tl.where(m, e + te[None, :], 0.0)

    @triton.autotune(configs=_configs(RB=[2, 4, 1], num_warps=[4, 8]), key=["n_cols", "DROPOUT"])
    @triton.jit(do_not_specialize=["n_rows", "seed"])
    def _fwd_kernel(IDS, POS, WE, PE, TE, W, B, Y, Mean, Rstd, n_rows, n_cols, eps, p, seed,
                    BLOCK: tl.constexpr, RB: tl.constexpr, DROPOUT: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        mc = cols < n_cols
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)
        te = tl.load(TE + cols, mask=mc, other=0.0).to(tl.float32)  # token type 0: the table's first row
        rows = tl.program_id(0) * RB + tl.arange(0, RB)
        ok = rows < n_rows
        m = ok[:, None] & mc[None, :]
        d, mean, rstd = _normalise(_sum_rows(IDS, POS, WE, PE, te, rows, ok, cols, mc, n_cols), m, n_cols, eps)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        if DROPOUT:
            y = tl.where(_keep(seed, rows, p, RB, BLOCK), y / (1.0 - p), 0.0)
        tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
        tl.store(Mean + rows, mean, mask=ok)
        tl.store(Rstd + rows, rstd, mask=ok)

    # Each program takes ROWS rows in tiles of RB and writes one row of partial sums of the LayerNorm weight / bias
    # gradients and of the token-type row's gradient (the column sums of DE), added by one torch reduction.
    @triton.autotune(configs=_configs(RB=[1, 2], ROWS=[16, 32], num_warps=[4, 8]), key=["n_cols", "DROPOUT"])
    @triton.jit(do_not_specialize=["n_rows", "seed"])
    def _bwd_kernel(DY, IDS, POS, WE, PE, TE, W, Mean, Rstd, DE, DWp, DBp, DTp, n_rows, n_cols, p, seed,
                    BLOCK: tl.constexpr, RB: tl.constexpr, ROWS: tl.constexpr, DROPOUT: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mc = cols < n_cols
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        te = tl.load(TE + cols, mask=mc, other=0.0).to(tl.float32)
        dw = tl.zeros([RB, BLOCK], dtype=tl.float32)
        db = tl.zeros([RB, BLOCK], dtype=tl.float32)
        dt = tl.zeros([RB, BLOCK], dtype=tl.float32)
        rows = pid * ROWS + tl.arange(0, RB)
        end = tl.minimum(pid * ROWS + ROWS, n_rows)
        for i in range(0, ROWS // RB):
            ok = rows < end
            m = ok[:, None] & mc[None, :]
            off = rows[:, None] * n_cols + cols[None, :]  # int32: the wrapper checks N * H < 2**31
            dy = _tile(DY, rows, ok, cols, mc, n_cols).to(tl.float32)
            if DROPOUT:
                dy = tl.where(_keep(seed, rows, p, RB, BLOCK), dy / (1.0 - p), 0.0)
            e = _sum_rows(IDS, POS, WE, PE, te, rows, ok, cols, mc, n_cols)
            mean = tl.load(Mean + rows, mask=ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=ok, other=0.0)
            xh = tl.where(m, (e - mean[:, None]) * rstd[:, None], 0.0)
            de = _normalise_grad(dy, xh, w, rstd, n_cols)
            tl.store(DE + off, de, mask=m)
            dw += dy * xh
            db += dy
            dt += de
            rows += RB
        tl.store(DWp + pid * n_cols + cols, tl.sum(dw, axis=0), mask=mc)
        tl.store(DBp + pid * n_cols + cols, tl.sum(db, axis=0), mask=mc)
        tl.store(DTp + pid * n_cols + cols, tl.sum(dt, axis=0), mask=mc)


def _scatter(table: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, padding_idx: int | None = None
             ) -> torch.Tensor:
    """Gradient of `table[index]` given the fp32 gradient `rows` of the lookup, in fp32, the `padding_idx` row zero:
    `nn.Embedding`'s own backward op (`embedding_dense_backward`: on CUDA it sorts the indices and sums each id's rows
    as a segment, deterministic, where `index_add_` adds 100M fp32 atomics per table in no fixed order; notes_speed.md
    #48)."""
    return torch.ops.aten.embedding_dense_backward(rows, index, table.shape[0],
                                                   -1 if padding_idx is None else padding_idx, False)


class _EmbedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, pos, word, position, token_type, weight, bias, p: float, eps: float, dtype: torch.dtype,
                padding_idx: int | None):
        n, h = ids.numel(), word.shape[1]
        y = torch.empty(n, h, dtype=dtype, device=ids.device)
        mean = torch.empty(n, dtype=torch.float32, device=ids.device)
        rstd = torch.empty_like(mean)
        seed = int(torch.randint(0, 2**31 - 1, (1,))) if p > 0 else 0  # CPU generator: no GPU sync
        if n:
            _fwd_kernel[lambda meta: (triton.cdiv(n, meta["RB"]),)](
                ids, pos, word, position, token_type, weight, bias, y, mean, rstd, n, h, eps, p, seed,
                BLOCK=_block(h), DROPOUT=p > 0)
        ctx.save_for_backward(ids, pos, word, position, token_type, weight, mean, rstd)
        ctx.p, ctx.seed, ctx.padding_idx, ctx.bias_dtype = p, seed, padding_idx, bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, pos, word, position, token_type, weight, mean, rstd = ctx.saved_tensors
        n, h = ids.numel(), word.shape[1]
        dy = dy.contiguous()
        de = torch.empty(n, h, dtype=torch.float32, device=dy.device)

        def launch(parts):
            _bwd_kernel[lambda meta: (triton.cdiv(n, meta["ROWS"]),)](
                dy, ids, pos, word, position, token_type, weight, mean, rstd, de, parts[0], parts[1], parts[2], n, h,
                ctx.p, ctx.seed, BLOCK=_block(h), DROPOUT=ctx.p > 0)

        sums = row_partial_sums(_bwd_kernel, n, h, 3, dy.device, launch)
        d_word = _scatter(word, ids, de, ctx.padding_idx)
        d_type = torch.zeros(token_type.shape, dtype=torch.float32, device=dy.device)
        d_type[0] = sums[2]
        return (None, None, d_word.to(word.dtype), _scatter(position, pos, de).to(position.dtype),
                d_type.to(token_type.dtype), sums[0].to(weight.dtype), sums[1].to(ctx.bias_dtype), None, None, None,
                None)


_apply = torch.compiler.disable(_EmbedLayerNorm.apply)  # out of torch.compile graphs, as fused_norm's kernels


def embed(emb, input_ids: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype | None = None,
          fused: bool = True) -> torch.Tensor:
    """(N, H) embeddings of a packed (N,) stream through HF `BertEmbeddings` `emb` (token type 0, positions
    `position_ids`), in `dtype` (default: the tables' dtype). With `fused`, one Triton kernel each way where
    `available` on the ids' device (dropout from `emb.dropout` while it trains); otherwise `emb` itself."""
    if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
        raise ValueError(f"embed: input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
                         f"must be the same (N,) stream")
    tables = (emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight)
    dtype = dtype or tables[0].dtype
    fused = (fused and available(input_ids.device) and input_ids.numel() * tables[0].shape[1] <= _MAX_ELEMENTS
             and getattr(emb, "position_embedding_type", "absolute") == "absolute")
    if not fused:
        return emb(input_ids=input_ids[None], position_ids=position_ids[None],
                   token_type_ids=torch.zeros_like(input_ids)[None])[0].to(dtype)
    # the lookups' range checks, as F.embedding's on the device (an assert there, not a host sync)
    for name, idx, table in (("input_ids", input_ids, tables[0]), ("position_ids", position_ids, tables[1])):
        if idx.numel():
            torch._assert_async((idx.min() >= 0) & (idx.max() < table.shape[0]),
                                f"embed: {name} out of range for a table of {table.shape[0]} rows")
    norm, drop = emb.LayerNorm, emb.dropout
    return _apply(input_ids.contiguous(), position_ids.contiguous(), *(t.contiguous() for t in tables), norm.weight,
                  norm.bias, float(drop.p if drop.training else 0.0), float(norm.eps), dtype,
                  emb.word_embeddings.padding_idx)
