#!/usr/bin/env python3
"""How much FP8 GEMMs could take off the BERT-base step on this GPU (issue 6 goal 1, the lead of notes_speed.md,
session 12: 8x the reference at seq 512 is out of reach in bf16). GPU only; torchao comes as a wheel (not a project
dependency: this measures whether it should become one).

For the four linear layers of a BERT-base layer (Q/K/V 768 -> 2304, attention output 768 -> 768, intermediate
768 -> 3072, output 3072 -> 768) on `--rows` tokens (the packed step's ~131k), forward + backward with a bf16 input and
output gradient, as training runs them:
- `bf16`: the layer in bf16 (cuBLAS), as today;
- `fp8_tensorwise` / `fp8_rowwise`: torchao's `Float8Linear` (dynamic scaling, e4m3 everywhere), casts included,
  under torch.compile (torchao's recommended use: the amax and cast passes fused by inductor);
- `scaled_mm_only`: the three FP8 GEMMs alone (`torch._scaled_mm`, tensorwise scales, operands cast beforehand): the
  ceiling if every cast were fused into the kernel that produces its input.
Also the FFN block (intermediate + GELU + output) compiled, bf16 against FP8, where inductor can fuse the casts into
GELU. Relative errors of the output and input / weight gradients against fp32 are reported beside each variant.

    PYTHONPATH=.bench/site:$PWD python3 experiments/device/fp8_bench.py --out $OUT/fp8_bench.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import timed, write_rows  # noqa: E402

SHAPES = {"qkv": (768, 2304), "attn_out": (768, 768), "intermediate": (768, 3072), "output": (3072, 768)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def errors(fn, linear, ref, x: torch.Tensor, g: torch.Tensor) -> list[float]:
    """Relative errors of the output, input gradient and weight gradient of `fn` (whose linear layer is `linear`)
    against the fp32 layer `ref` with the same weights, for input `x` and output gradient `g`."""
    xr = x.detach().float().requires_grad_()
    ref.zero_grad(set_to_none=True)
    yr = ref(xr)
    yr.backward(g)
    xi = x.detach().clone().requires_grad_()
    linear.zero_grad(set_to_none=True)
    y = fn(xi)
    y.backward(g.to(y.dtype))
    return [round(rel(y, yr), 5), round(rel(xi.grad, xr.grad), 5), round(rel(linear.weight.grad, ref.weight.grad), 5)]


def scaled_mm_only(m: int, k: int, n: int, device, repeats: int) -> float:
    """ms of the forward GEMM and the two backward GEMMs in FP8 (e4m3 operands, tensorwise scales), casts excluded."""
    e4 = torch.float8_e4m3fn
    one = torch.ones((), device=device)
    x = torch.randn(m, k, device=device).to(e4)
    w = torch.randn(n, k, device=device).to(e4)
    dy = torch.randn(m, n, device=device).to(e4)
    dy_t = dy.float().t().contiguous().to(e4)  # (n, m) row-major: dW's left operand
    w_t = w.float().t().contiguous().to(e4)  # (k, n) row-major, so w_t.t() is column-major (n, k)
    x_t = x.float().t().contiguous().to(e4)  # (k, m): x_t.t() is column-major (m, k)

    def step():
        torch._scaled_mm(x, w.t(), one, one, out_dtype=torch.bfloat16)  # y = x w^T
        torch._scaled_mm(dy, w_t.t(), one, one, out_dtype=torch.bfloat16)  # dx = dy w
        torch._scaled_mm(dy_t, x_t.t(), one, one, out_dtype=torch.float32)  # dW = dy^T x

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_bench: needs a CUDA GPU with FP8 tensor cores (H100 / H200)")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []

    def emit(**row):
        row.update(rows_tokens=a.rows, device=torch.cuda.get_device_name(), torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)

    recipes = {"fp8_tensorwise": Float8LinearConfig.from_recipe_name("tensorwise"),
               "fp8_rowwise": Float8LinearConfig.from_recipe_name("rowwise")}
    x_all = {k: torch.randn(a.rows, k, device=device, dtype=torch.bfloat16) for k in (768, 3072)}
    for name, (k, n) in SHAPES.items():
        ref = torch.nn.Sequential(torch.nn.Linear(k, n)).to(device)  # fp32: the numerics' reference
        x = x_all[k].requires_grad_()
        g = torch.randn(a.rows, n, device=device)
        variants = {"bf16": copy.deepcopy(ref).to(torch.bfloat16)}
        for rname, cfg in recipes.items():
            variants[rname] = convert_to_float8_training(copy.deepcopy(ref).to(torch.bfloat16), config=cfg)
        for vname, mod in variants.items():
            fn = torch.compile(mod) if vname != "bf16" else mod
            _, fb, _ = timed(fn, (x,), a.repeats, 3, device)
            emit(group="linear", layer=name, variant=vname, fwd_bwd_ms=round(fb, 4),
                 rel_err_out_dx_dw=errors(fn, mod[0], ref[0], x, g))
        emit(group="linear", layer=name, variant="scaled_mm_only",
             fwd_bwd_ms=round(scaled_mm_only(a.rows, k, n, device, a.repeats), 4))
    # the FFN block, compiled either way
    for vname in ("bf16", *recipes):
        ffn = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))
        ffn = ffn.to(device).to(torch.bfloat16)
        if vname != "bf16":
            ffn = convert_to_float8_training(ffn, config=recipes[vname])
        _, fb, _ = timed(torch.compile(ffn), (x_all[768].requires_grad_(),), a.repeats, 3, device)
        emit(group="ffn_compiled", variant=vname, fwd_bwd_ms=round(fb, 4))
    write_rows(rows, a.out)


if __name__ == "__main__":
    main()
