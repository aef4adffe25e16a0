#!/usr/bin/env python3
"""Attention alone in the packed MLM step (issue 6 goal 1: MFU >= 0.50): which kernel suits short sessions.

The profile of one packed BERT-base step at seq 128 on an H200 (results/profile_mlm_base_seq128_packed.txt, 3 steps)
puts the variable-length FlashAttention forward + backward at ~25 ms of a ~191 ms step (13%). By a FLOP count
attention is ~0.4 ms of work there. The kernel tiles each session in 128-row blocks, while sessions hold ~120 tokens
at seq 128 and ~56 at seq 64. Removing most of that time would lift the step from MFU 0.45 to about 0.50.

The same packed batch (sessions drawn from --lengths and capped at --seq-len, about --tokens tokens; 12 heads x 64;
bf16 on CUDA) goes through each variant, forward and forward + backward, per layer:

  varlen        torch's varlen_attn, what `models.packed.varlen_attention` runs now (on a CPU: its padded fallback)
  sdpa-<kernel> sessions sorted by length and cut into --buckets padded (B, T) batches with a key-padding mask,
                through scaled_dot_product_attention pinned to one kernel (efficient, cudnn, math)
  njt-<kernel>   the packed rows as nested jagged tensors through SDPA pinned to one kernel (flash, efficient,
                cudnn): torch's own ragged dispatch
  triton        our Triton kernels for short sessions (`models.fused_attention`, pretrain.fused_attention)
  triton-db     the same, also summing three bias gradients (the column sums of dq, dk, dv) in the backward
                kernels, as the packed encoder runs them (in the step without them: three torch sums per layer)
  flex          torch.nn.attention.flex_attention over the whole (1, N) stream with a document mask (block-sparse:
                only blocks that hold one session's rows are computed), under torch.compile

Each variant's output is compared with varlen's on every real token (max abs difference). A variant that a kernel
refuses is reported with its error, not skipped silently.

    python experiments/bench_attention.py --lengths .bench/lengths_sim.npy --seq-len 128 --out $OUT/bench_attention.json
    python experiments/bench_attention.py --device cpu --tokens 4096 --repeats 2   # logic check on a CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sessionbert.models import fused_attention as fa  # noqa: E402
from sessionbert.models.fused_attention import attention as fused_attention  # noqa: E402
from sessionbert.models.packed import varlen_attention  # noqa: E402


def make_batch(lengths: np.ndarray, seq_len: int, tokens: int, seed: int) -> np.ndarray:
    """Session lengths (capped at seq_len) drawn until about `tokens` tokens."""
    rng = np.random.default_rng(seed)
    ln = np.minimum(rng.choice(lengths, size=max(1, 4 * tokens // max(1, int(np.mean(lengths))))), seq_len)
    ln = ln[ln > 0]
    return ln[: int(np.searchsorted(np.cumsum(ln), tokens)) + 1].astype(np.int64)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, inputs: tuple, repeats: int, warmup: int, device) -> tuple[float, float, torch.Tensor]:
    """(forward ms, forward + backward ms, output) of fn(*inputs) (also used by bench_fused_norm.py)."""
    for _ in range(warmup):
        fn(*inputs).sum().backward()
        with torch.no_grad():  # a no-grad call can build its own kernel / graph (flex, cuDNN): not in the timing
            fn(*inputs)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(repeats):
            out = fn(*inputs)
    _sync(device)
    fwd = (time.perf_counter() - t0) / repeats * 1e3
    g = torch.randn_like(out)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*inputs).backward(g)
    _sync(device)
    return fwd, (time.perf_counter() - t0) / repeats * 1e3, out.detach()


def write_rows(rows: list[dict], path: str | None) -> None:
    """The result rows as JSON lines at `path` (nothing when None)."""
    if path:
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def sdpa_buckets(lens: torch.Tensor, cu: torch.Tensor, buckets: int, backend):
    """fn(q, k, v) over length-sorted padded buckets with a key-padding mask, pinned to `backend`."""
    from torch.nn.attention import sdpa_kernel

    order = torch.argsort(lens, stable=True)
    groups = [g for g in torch.tensor_split(order, buckets) if len(g)]
    plans = []
    for g in groups:
        T = int(lens[g].max())
        ar = torch.arange(T, device=lens.device)
        valid = ar[None, :] < lens[g][:, None]  # (B, T)
        idx = (cu[:-1][g][:, None] + ar[None, :]).clamp_max(int(cu[-1]) - 1)
        plans.append((idx, valid))
    inverse = torch.argsort(torch.cat([idx[valid] for idx, valid in plans]))  # bucket rows -> stream order

    def fn(q, k, v):
        outs = []
        with sdpa_kernel(backend):
            for idx, valid in plans:
                qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
                o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid[:, None, None, :])
                outs.append(o.transpose(1, 2)[valid])
        return torch.cat(outs)[inverse]
    return fn


def flex_document(cu: torch.Tensor, n: int, device):
    """fn(q, k, v): flex_attention over the (1, N) stream, attention only within a session (document mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), (cu[1:] - cu[:-1]).long())

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    # _compile=True: the mask is built block by block; uncompiled it materialises the (N, N) boolean first (128 GiB
    # at N = 131072, the OOM of the first run)
    mask = create_block_mask(same_doc, None, None, n, n, device=device.type, _compile=device.type == "cuda")
    attn = torch.compile(flex_attention) if device.type == "cuda" else flex_attention

    def fn(q, k, v):
        o = attn(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask)  # (1, heads, N, d)
        return o[0].transpose(0, 1)
    return fn


def njt(cu: torch.Tensor, backend):
    """fn(q, k, v): the packed rows as nested jagged tensors (offsets = cu), SDPA pinned to `backend`: torch's own
    ragged dispatch (flash / efficient / cudnn varlen kernels), no gather into padded buckets."""
    from torch.nn.attention import sdpa_kernel

    offsets = cu.long()

    def fn(q, k, v):
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qn, kn, vn)  # (B, heads, j, d)
        return o.transpose(1, 2).values()
    return fn


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=None, help=".npy of session token counts (default: lognormal, mean ~140)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=131072, help="tokens in the packed batch (one step's)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--buckets", type=int, default=8, help="sdpa variants: length buckets")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="varlen,njt-flash,njt-efficient,njt-cudnn,flex,sdpa-efficient,sdpa-cudnn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the JSON lines here")
    a = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = np.load(a.lengths) if a.lengths else np.random.default_rng(a.seed).lognormal(4.8, 0.5, 100_000)
    lens_np = make_batch(np.asarray(lengths).astype(np.int64), a.seq_len, a.tokens, a.seed)
    lens = torch.from_numpy(lens_np).to(device)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lens, 0)
    n, max_len = int(cu[-1]), int(lens.max())
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    q, k, v = (torch.randn(n, a.heads, a.head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    flops_fwd = float((4 * lens_np.astype(np.float64) ** 2 * a.heads * a.head_dim).sum())  # QK^T and PV
    kernels = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    results, ref = [], None
    for name in a.variants.split(","):
        row = {"variant": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "seq_len": a.seq_len, "sessions": len(lens_np), "tokens": n,
               "mean_len": round(float(lens_np.mean()), 1), "heads": a.heads, "head_dim": a.head_dim,
               "dtype": str(dtype).replace("torch.", "")}
        try:
            if name == "varlen":
                def fn(q, k, v):
                    return varlen_attention(q, k, v, cu, max_len)
            elif name.startswith("sdpa-"):
                fn = sdpa_buckets(lens, cu, a.buckets, kernels[name[5:]])
            elif name.startswith("njt-"):
                fn = njt(cu, kernels[name[4:]])
            elif name in ("triton", "triton-db"):
                bias_grads = ([torch.zeros(a.heads * a.head_dim, device=device, requires_grad=True) for _ in range(3)]
                              if name == "triton-db" else None)

                def fn(q, k, v):
                    return fused_attention(q, k, v, cu, max_len, bias_grads=bias_grads)
            elif name == "flex":
                fn = flex_document(cu, n, device)
            else:
                raise ValueError(f"unknown variant {name!r}")
            fwd, fwd_bwd, out = timed(fn, (q, k, v), a.repeats, a.warmup, device)
            row.update(fwd_ms=round(fwd, 3), fwd_bwd_ms=round(fwd_bwd, 3),
                       fwd_tflops=round(flops_fwd / fwd / 1e9, 1) if fwd > 0 else None)
            if ref is None:
                ref = out.float()
            row["max_abs_diff_vs_first"] = float((out.float() - ref).abs().max())
            if name.startswith("triton"):  # the autotuner's picks (Triton's interpreter: none)
                row["configs"] = {kn: str(getattr(getattr(fa, kn), "best_config", None))
                                  for kn in ("_attn_fwd", "_attn_bwd_kv", "_attn_bwd_q") if hasattr(fa, kn)}
        except Exception as e:  # a kernel that refuses these shapes or masks: reported, the next variant runs
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        results.append(row)
        print(json.dumps(row), flush=True)
    write_rows(results, a.out)
    return results


if __name__ == "__main__":
    main()
