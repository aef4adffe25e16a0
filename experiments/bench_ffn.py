#!/usr/bin/env python3
"""BERT's feed-forward block alone in the packed MLM step (issue 6 goal 1): bias + GELU in the GEMMs' epilogues.

One layer's feed-forward block `z = gelu(x W1^T + b1) W2^T` (with `x` also passed on as the residual, whose gradient
meets the block's input gradient), on --tokens packed rows, bf16 on CUDA, per variant:

  gelu      what `trainer=gpu` ran before: `branch_in` (cuBLAS GEMM, residual gradient summed in its epilogue), the
            bias + GELU Triton kernel each way (`models.fused_gelu`), cuBLAS for the output GEMM
  epilogue  `models.fused_ffn` (pretrain.fused_ffn): the two GEMMs that write (N, 4H) tensors are Triton kernels with
            the bias + GELU (forward) and the GELU derivative + bias-gradient sums (backward) in their epilogues

Rows: forward and forward + backward ms per layer (both gradients, of z and of the residual, as in the encoder), and
each variant's output / input-gradient / weight-gradient error against the same block in fp32. Then the two GEMMs
alone (`kernels`): cuBLAS's plain GEMM and ours with its epilogue, TFLOP/s, to show what the Triton GEMM costs
against cuBLAS and what the epilogue saves; and the autotuner's picks.

    python experiments/bench_ffn.py --out $OUT/bench_ffn.json          # on a GPU
    TRITON_INTERPRET=1 python experiments/bench_ffn.py --device cpu --tokens 64 --hidden 32 --repeats 1   # logic
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sessionbert.models import fused_ffn as ff  # noqa: E402
from sessionbert.models.branch_linear import branch_in  # noqa: E402
from sessionbert.models.fused_gelu import bias_gelu  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def block(variant: str, lin1: torch.nn.Linear, lin2: torch.nn.Linear):
    """fn(x) -> (z, residual) for `variant`."""
    if variant == "gelu":
        def fn(x):
            y, res = branch_in(x, [lin1], bias=False)
            return F.linear(bias_gelu(y, lin1.bias), lin2.weight), res
    elif variant == "epilogue":
        def fn(x):
            return ff.fused_ffn(x, lin1, lin2)
    else:
        raise ValueError(f"bench_ffn: unknown variant {variant!r} (gelu, epilogue)")
    return fn


def run(fn, x, gz, gr, repeats: int, warmup: int, device, dtype) -> tuple[float, float, list[torch.Tensor]]:
    """(forward ms, forward + backward ms, step): `step()` runs forward + backward once under autocast to `dtype`."""
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z, res = fn(x)
        # a fresh residual gradient per step, as the LayerNorm backward writes it: both variants accumulate the block's
        # input gradient into it in place
        torch.autograd.backward([z, res], [gz, gr.clone()])
        return z

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(repeats):
            fn(x)
    _sync(device)
    fwd = (time.perf_counter() - t0) / repeats * 1e3
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    both = (time.perf_counter() - t0) / repeats * 1e3
    return fwd, both, step


def grads(step, x, lin1, lin2) -> list[torch.Tensor]:
    for t in (x, lin1.weight, lin1.bias, lin2.weight):
        t.grad = None
    z = step()
    return [t.detach().float().clone() for t in (z, x.grad, lin1.weight.grad, lin1.bias.grad, lin2.weight.grad)]


def kernel_ms(fn, repeats: int, device) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=124_000, help="packed rows (one seq-128 step holds ~124k)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    ap.add_argument("--variants", default="gelu,epilogue")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the JSON lines here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, i, n = a.hidden, a.intermediate or 4 * a.hidden, a.tokens
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(h, i).to(device), torch.nn.Linear(i, h).to(device)
    x = (torch.randn(n, h, device=device) * 0.5).requires_grad_()
    gz, gr = torch.randn(n, h, device=device, dtype=dtype) * 1e-2, torch.randn(n, h, device=device, dtype=dtype) * 1e-2
    base = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": getattr(ff.triton, "__version__", None), "tokens": n, "hidden": h, "intermediate": i,
            "dtype": str(dtype).replace("torch.", "")}
    ref_step = None
    x32 = x.detach().clone().requires_grad_()

    def ref_fn(xx):
        return F.linear(F.gelu(lin1(xx)), lin2.weight), xx
    with torch.autocast(device.type, enabled=False):
        def ref_step():
            z, res = ref_fn(x32)
            torch.autograd.backward([z, res], [gz.float(), gr.float().clone()])
            return z
        ref = grads(ref_step, x32, lin1, lin2)
    names = ["z", "dx", "dW1", "db1", "dW2"]
    flops = 3 * 2 * 2 * n * h * i  # two GEMMs forward, four backward
    rows = []
    for variant in a.variants.split(","):
        row = dict(base, variant=variant)
        try:
            fn = block(variant, lin1, lin2)
            fwd, both, step = run(fn, x, gz, gr, a.repeats, a.warmup, device, dtype)
            out = grads(step, x, lin1, lin2)
            row.update(fwd_ms=round(fwd, 4), fwd_bwd_ms=round(both, 4), tflops=round(flops / both / 1e9, 1),
                       max_rel_err={k: float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))
                                    for k, o, r in zip(names, out, ref)})
        except Exception as e:  # reported, not skipped silently
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        print(json.dumps(row), flush=True)

    # the two GEMMs alone: cuBLAS's plain GEMM against ours with its epilogue
    if device.type == "cuda" or ff.available(device):
        xb, w1, w2 = x.detach().to(dtype), lin1.weight.detach().to(dtype), lin2.weight.detach().to(dtype)
        dz = gz.to(dtype)
        pre, _ = ff.mm_gelu(xb, w1, lin1.bias)
        gemm = 2 * n * h * i
        k = {"fwd_cublas_mm": kernel_ms(lambda: torch.mm(xb, w1.t()), a.repeats, device),
             "fwd_cublas_mm_bias_gelu": kernel_ms(lambda: bias_gelu(torch.mm(xb, w1.t()), lin1.bias), a.repeats,
                                                  device),
             "fwd_triton_mm_gelu": kernel_ms(lambda: ff.mm_gelu(xb, w1, lin1.bias), a.repeats, device),
             "bwd_cublas_mm": kernel_ms(lambda: torch.mm(dz, w2), a.repeats, device),
             "bwd_triton_mm_dgelu": kernel_ms(lambda: ff.mm_dgelu(dz, w2, pre), a.repeats, device)}
        row = dict(base, variant="kernels", ms={kk: round(v, 4) for kk, v in k.items()},
                   tflops={kk: round(gemm / v / 1e9, 1) for kk, v in k.items()},
                   picked=str(ff._mm_kernel.cache))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
