"""Padding-free BERT forward for MLM pretraining (issue 6): sessions packed end to end into one token stream.

Why our own forward loop: Hugging Face `BertModel` only has a padding-free path through the `flash-attn` package
(not installed on our machines, and a CUDA build users must compile) and its masking utilities, whose internals
change between transformers releases. This module runs the *same parameters* (`bert.embeddings`,
`bert.encoder.layer[i]`'s Linear / LayerNorm / Dropout modules, whose names have been stable since transformers 2)
over a packed (N,) stream, with attention restricted to each session through PyTorch's variable-length
FlashAttention (`torch.nn.attention.varlen.varlen_attn`, cumulative sequence offsets, no mask tensor). The
checkpoint, `save_pretrained`, fine-tuning and inference are untouched: they see an ordinary `BertModel`.

Where the varlen kernel is missing (CPU, older torch), `varlen_attention` gathers the packed rows into a padded
(B, T) batch and calls SDPA with a key-padding mask: same maths, used by the tests.

The varlen kernel has no attention-probability dropout, so `packed_hidden` refuses a model with
`attention_probs_dropout_prob > 0` while training (the pipeline sets it to 0 when `pretrain.packed` is on, as
recent BERT pretraining recipes do); hidden dropout is kept.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .branch_linear import branch_in
from .fused_attention import attention as fused_attention_fn
from .fused_attention import runs_on as fused_attention_runs_on
from .fused_embed import embed
from .fused_gelu import bias_gelu, dense_gelu
from .fused_norm import dropout_add_layer_norm, layer_norm_as

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn = None


def has_varlen_kernel(device: torch.device | str) -> bool:
    return _varlen_attn is not None and torch.device(device).type == "cuda"


def padded_index(cu_seqlens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max_len) row of each packed position, clamped, and the (B, max_len) validity mask, from the (B+1,)
    cumulative offsets. Sequences are contiguous and in order, so `x[idx][valid]` is `x` again."""
    starts, lens = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ar = torch.arange(max_len, device=cu_seqlens.device)
    valid = ar[None, :] < lens[:, None]
    idx = (starts[:, None] + ar[None, :]).clamp_max(max(int(cu_seqlens[-1]) - 1, 0))
    return idx, valid


class QueryRows(NamedTuple):
    """Positions of a packed stream that are the only queries of the last layer's attention (`packed_hidden`), from
    `PackedMLMCollator`: `index` (M,) int64 stream positions, the first `n` of them distinct, sorted, the masked
    positions (the rest filler rows, ignored by the loss); `cu_seqlens` (B+1,) int32: session i's queries are
    index[cu_seqlens[i]:cu_seqlens[i+1]] (same sessions as the stream's cu_seqlens, filler sessions included);
    `max_len`: the most queries in one session."""
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    n: int


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float | None = None, fused: bool = False, bias_grads: tuple | None = None,
                     q_rows: QueryRows | None = None) -> torch.Tensor:
    """(N, heads, d) packed q/k/v -> (N, heads, d); each position attends only within its own session.
    `fused`: our Triton kernels for short sessions (`models.fused_attention`) where they run; `bias_grads` (with them
    only): the Q / K / V bias parameters whose gradients those kernels sum. `q_rows`: only those positions are
    queries; the output is their (q_rows.n, heads, d) rows, in q_rows.index's order."""
    if fused and fused_attention_runs_on(q):
        return fused_attention_fn(q, k, v, cu_seqlens, max_len, scale=scale, bias_grads=bias_grads, q_rows=q_rows)
    if bias_grads is not None:
        raise ValueError("varlen_attention: bias_grads needs the fused kernels (fused=True, where they run)")
    cu_q, max_q = cu_seqlens, max_len
    if q_rows is not None:
        q, cu_q, max_q = q[q_rows.index[: q_rows.n]], q_rows.cu_seqlens, int(q_rows.max_len)
        if not q_rows.n:
            return q  # no query: (0, heads, d)
    if has_varlen_kernel(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        cu, cuq = cu_seqlens.to(torch.int32), cu_q.to(torch.int32)
        return _varlen_attn(q, k, v, cuq, cu, max_q, max_len, scale=scale)
    idx, valid = padded_index(cu_seqlens, max_len)  # fallback: padded SDPA with a key-padding mask
    qidx, qvalid = padded_index(cu_q, max_q) if q_rows is not None else (idx, valid)
    qb = q[qidx].transpose(1, 2)  # (B, heads, Tq, d)
    kb, vb = (t[idx].transpose(1, 2) for t in (k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[qvalid]  # (N or q_rows.n, heads, d)


# `layer_norm_as` kept out of torch.compile graphs (the default): Inductor's fused dropout + add + LayerNorm
# backward took 2.5 ms per call on an H200 where eager's LayerNorm backward takes 0.46 ms, with the stream length
# changing between steps or fixed (experiments/notes_speed.md #10, #28).
_layer_norm_eager = torch.compiler.disable(layer_norm_as)


def packed_hidden(bert, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_len: int, fused_qkv: bool = False, layer_norm_in_graph: bool = False,
                  fused_norm: bool = False, fused_gelu: bool = False, fused_residual: bool = False,
                  fused_attention: bool = False, rows: torch.Tensor | QueryRows | None = None) -> torch.Tensor:
    """Last hidden layer (N, H) of HF `BertModel` `bert` for a packed stream: input_ids, position_ids (N,)
    (positions restart at 0 for each session), cu_seqlens (B+1,) offsets, max_len the longest session.

    `rows` (M,) int64 positions in the stream: return only their last hidden rows (M, H), `hidden[rows]`, and run the
    last layer's work past its attention on those rows alone. Its keys and values still come from every position of a
    session, so its attention runs on the whole stream; its attention-output dense layer, residual, LayerNorms, and
    its intermediate and output layers (9 of its 12 H x H weight blocks) only on `rows`. Same maths as `hidden[rows]`
    (tests/test_packed.py): MLM pretraining (`MLMModule.packed_loss`) needs the masked positions only, ~15% of the
    stream, so this skips ~85% of those (~5% of an encoder step's FLOPs: the "sparse prediction" of cramming's BERT
    recipe applied one layer further down).

    `rows` as a `QueryRows` (the collator's masked positions with their per-session offsets): the last layer's
    attention too runs its queries on those rows only (keys and values from every position): the first `rows.n` rows
    of the result equal `hidden[rows.index[:rows.n]]`; the filler rows after them get the rest of the layer over a
    zero attention output (finite, and no gradient reaches the attention from them: the loss ignores them).

    `fused_qkv`: the query, key and value projections as one (H -> 3H) GEMM over the concatenated weights (one read of
    the input and one input-gradient GEMM instead of three, plus two adds); the parameters stay the three Linears, so
    checkpoints are unchanged. Same maths (tests/test_packed.py); its speed is measured by `bench_gpu.py --fused-qkv`.

    `layer_norm_in_graph`: under torch.compile, let Inductor fuse the LayerNorms with the dropout and residual add
    around them (by default they stay eager kernels); no effect without compile. Measured slower (notes_speed.md #28).

    `fused_norm`: each sub-block's `LayerNorm(dropout(dense_out) + residual)` as one Triton kernel forward and one
    backward (`models.fused_norm`, where Triton and a GPU are there; otherwise the same maths in eager PyTorch).
    The dense layer's bias is added in that kernel and its gradient summed there (no pass of its own in backward).
    The embeddings too (`models.fused_embed`: lookups, sum, LayerNorm and dropout as one kernel each way).
    Dropout draws come from another generator than torch's, so losses match the unfused path only without dropout.

    `fused_gelu`: the intermediate layer's bias + GELU as one Triton kernel forward and one backward that also sums
    the bias gradient (`models.fused_gelu`; `hidden_act` must be "gelu", BERT's exact GELU).

    `fused_residual`: the Linears that open each sub-block (Q/K/V, the intermediate layer) through
    `models.branch_linear.branch_in`, whose backward adds the residual's gradient in their input-gradient GEMMs (no
    separate add, no stack of dq / dk / dv); with `fused_qkv` Q/K/V stay one GEMM forward.

    `fused_attention`: attention within each session through our Triton kernels for short sessions
    (`models.fused_attention`: one backward kernel, no atomics, for sessions up to 128 tokens) instead of torch's
    varlen FlashAttention; they also sum the Q / K / V biases' gradients. The varlen path where Triton or a GPU is
    missing."""
    cfg = bert.config
    if fused_gelu and cfg.hidden_act != "gelu":
        raise ValueError(f"packed_hidden: fused_gelu computes exact GELU, the model's hidden_act is {cfg.hidden_act!r}")
    if bert.training and cfg.attention_probs_dropout_prob > 0:
        raise ValueError("packed pretraining: the varlen attention kernel has no attention-probability dropout; "
                         "set model attention_probs_dropout_prob to 0 (pipeline: pretrain.packed sets it)")
    heads = cfg.num_attention_heads
    dev = input_ids.device.type
    # Under autocast the residual stream stays in the autocast dtype (bf16): autocast would run every LayerNorm in
    # fp32 and cast its output back for the next Linear, i.e. a fp32 copy of (N, H) and a cast per Linear, and the
    # same in backward (measured: ~12% of an H200 step in casts). LayerNorm runs on bf16 input and bf16 copies of its
    # weights (statistics accumulate in fp32); all weights stay fp32 master copies, cast per step like autocast's.
    amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    # (N, H) in amp's dtype; with fused_norm the lookups' sum + LayerNorm + dropout as one kernel each way
    x = embed(bert.embeddings, input_ids, position_ids, amp, fused=fused_norm)
    n, h = x.shape
    # with the fused attention kernels (q / k / v in x's dtype), the Q / K / V projections add their biases detached
    # and those kernels sum the biases' gradients
    fold_bias_grads = fused_attention and fused_attention_runs_on(x)

    ln = layer_norm_as if layer_norm_in_graph else _layer_norm_eager

    def close(out, y, x):
        """The end of a sub-block (`out`: BertSelfOutput / BertOutput): LayerNorm(dropout(dense(y)) + x)."""
        if fused_norm:
            return dropout_add_layer_norm(F.linear(y, out.dense.weight), x, out.LayerNorm,
                                          out.dropout.p if out.dropout.training else 0.0, a_bias=out.dense.bias)
        z = out.dropout(out.dense(y)) + x
        return out.LayerNorm(z) if amp is None else ln(z, out.LayerNorm, amp)

    last = len(bert.encoder.layer) - 1
    qrows = rows if isinstance(rows, QueryRows) else None
    if qrows is not None:
        rows = qrows.index
    for i, layer in enumerate(bert.encoder.layer):
        sa = layer.attention.self
        res = x  # the sub-block's residual
        lins = (sa.query, sa.key, sa.value)
        bias_grads = tuple(lin.bias for lin in lins) if fold_bias_grads else None
        if fused_residual:
            *qkv, res = branch_in(x, list(lins), fuse=fused_qkv, bias_grad=not fold_bias_grads)  # column slices
            q, k, v = (t.view(n, heads, h // heads) for t in qkv)
        elif fused_qkv:
            w = torch.cat([lin.weight for lin in lins])  # (3H, H)
            b = torch.cat([lin.bias for lin in lins])
            q, k, v = F.linear(x, w, b.detach() if fold_bias_grads else b).view(n, 3, heads, h // heads).unbind(1)
        else:  # views: last dim contiguous (above too)
            q, k, v = (F.linear(x, lin.weight, lin.bias.detach() if fold_bias_grads else lin.bias)
                       .view(n, heads, h // heads) for lin in lins)
        trim = qrows is not None and i == last  # the last layer's queries on the masked rows only
        a = varlen_attention(q, k, v, cu_seqlens, max_len, scale=sa.attention_head_size ** -0.5,
                             fused=fused_attention, bias_grads=bias_grads, q_rows=qrows if trim else None)
        if trim:  # (n, heads, d) -> (M, H), the filler rows' attention output zero
            a = F.pad(a.reshape(qrows.n, h), (0, 0, 0, len(rows) - qrows.n))
            res = res[rows]
        elif rows is not None and i == last:  # the rest of the last layer is row-wise: on `rows` only
            a, res = a.reshape(n, h)[rows], res[rows]
        else:
            a = a.reshape(n, h)
        x = close(layer.attention.output, a, res)
        inter, res = layer.intermediate, x
        if fused_residual:  # with fused_gelu the bias is added (and its gradient summed) in bias_gelu
            y, res = branch_in(x, [inter.dense], bias=not fused_gelu)
            y = bias_gelu(y, inter.dense.bias) if fused_gelu else inter.intermediate_act_fn(y)
        else:
            y = dense_gelu(inter.dense, x) if fused_gelu else inter.intermediate_act_fn(inter.dense(x))
        x = close(layer.output, y, res)
    if rows is not None and last < 0:  # no layers: the embeddings are the last hidden layer
        x = x[rows]
    return x
