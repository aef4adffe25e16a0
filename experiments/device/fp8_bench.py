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
- group `gemms` (`gemm_rows`): the layer's three GEMMs alone in bf16 and in FP8 (`torch._scaled_mm`): all three
  tensorwise (the ceiling if every cast were free), and the row-wise recipe that a fused implementation would use
  (forward and input-gradient GEMMs in FP8 with per-row scales, weight gradient in bf16), without and with its casts.
Also the FFN block (intermediate + GELU + output) compiled, bf16 against FP8, where inductor can fuse the casts into
GELU. Relative errors of the output and input / weight gradients against fp32 are reported beside each variant.

    pip install --no-deps --target .bench/fp8site torchao   # here, then carry .bench to the GPU machine
    PYTHONPATH=.bench/fp8site:$PWD python3 experiments/device/fp8_bench.py --out $OUT/fp8_bench.json
    python3 experiments/device/fp8_bench.py --only-gemms      # the `gemms` group alone: no torchao needed

torchao sits on its own path because transformers probes it on import (and fails on a copy without its version
metadata); results of session 13: experiments/results/fused_kernels_dev/s13_call{3,4}_fp8*/.
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


def gpu_ms(step, repeats: int) -> float:
    """ms per call of `step()` on the GPU (CUDA events, 3 warm-up calls)."""
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


E4M3_MAX = 448.0


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 copy of `x` and the (rows, 1) fp32 scales that undo it (compiled: one pass per row)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    return (x.float() * (E4M3_MAX / amax)).to(torch.float8_e4m3fn), amax / E4M3_MAX


def gemm_rows(m: int, k: int, n: int, device, repeats: int) -> list[dict]:
    """The GEMMs of one linear layer's forward + backward (y = x w^T, dx = dy w, dW = dy^T x) for (m, k) -> (m, n):
    - `mm_bf16`: the three in bf16 (cuBLAS), as today;
    - `scaled_mm_only`: the three in FP8, tensorwise scales, operands cast beforehand (casts excluded);
    - `rowwise_fwd_dgrad_gemms`: y and dx in FP8 with row-wise scales (x and dy per row, w per output row for y and
      per input column for dx: scales only along dimensions that are not summed), dW in bf16; casts excluded;
    - `rowwise_fwd_dgrad_with_casts`: the same with its casts (x and dy per row, one pass each, compiled; w's two
      copies) in the timing: what a layer would pay without fusing the casts into the kernels producing x and dy.
    Numerics of the row-wise recipe against fp32: relative errors of y and dx."""
    e4 = torch.float8_e4m3fn
    one = torch.ones((), device=device)
    bf = torch.bfloat16
    x, w, dy = (torch.randn(*s, device=device, dtype=bf) for s in ((m, k), (n, k), (m, n)))
    dy_t, x_t, w_t = dy.t().contiguous(), x.t().contiguous(), w.t().contiguous()
    rows = [dict(variant="mm_bf16", fwd_bwd_ms=gpu_ms(
        lambda: (x @ w.t(), dy @ w, dy_t @ x_t.t()), repeats))]
    x8, w8, dy8, dyt8, wt8, xt8 = (t.float().to(e4) for t in (x, w, dy, dy_t, w_t, x_t))
    rows.append(dict(variant="scaled_mm_only", fwd_bwd_ms=gpu_ms(lambda: (
        torch._scaled_mm(x8, w8.t(), one, one, out_dtype=bf),  # y = x w^T (b column-major: w8.t())
        torch._scaled_mm(dy8, wt8.t(), one, one, out_dtype=bf),  # dx = dy w
        torch._scaled_mm(dyt8, xt8.t(), one, one, out_dtype=torch.float32)), repeats)))  # dW = dy^T x
    quant = torch.compile(quant_rows, dynamic=False) if device.type == "cuda" else quant_rows  # CPU: the tests
    xq, sx = quant(x)
    dyq, sdy = quant(dy)
    wq, sw = quant(w)  # per output row of w: (n, 1) -> as y's column scales (1, n)
    wtq, swt = quant(w_t)  # per input column of w (rows of w^T): (k, 1) -> dx's column scales (1, k)

    def rowwise_gemms():
        y = torch._scaled_mm(xq, wq.t(), sx, sw.t(), out_dtype=bf)
        dx = torch._scaled_mm(dyq, wtq.t(), sdy, swt.t(), out_dtype=bf)
        return y, dx, dy_t @ x_t.t()

    def rowwise_with_casts():
        a, sa = quant(x)
        g, sg = quant(dy)
        b, sb = quant(w)
        bt, sbt = quant(w_t)
        y = torch._scaled_mm(a, b.t(), sa, sb.t(), out_dtype=bf)
        dx = torch._scaled_mm(g, bt.t(), sg, sbt.t(), out_dtype=bf)
        return y, dx, dy_t @ x_t.t()

    y, dx, _ = rowwise_gemms()
    y32, dx32 = x.float() @ w.float().t(), dy.float() @ w.float()
    yb, dxb = x @ w.t(), dy @ w
    rows.append(dict(variant="rowwise_fwd_dgrad_gemms", fwd_bwd_ms=gpu_ms(rowwise_gemms, repeats),
                     rel_err_y_dx=[round(rel(y, y32), 5), round(rel(dx, dx32), 5)],
                     bf16_rel_err_y_dx=[round(rel(yb, y32), 5), round(rel(dxb, dx32), 5)]))
    rows.append(dict(variant="rowwise_fwd_dgrad_with_casts", fwd_bwd_ms=gpu_ms(rowwise_with_casts, repeats)))
    cast = gpu_ms(lambda: (quant(x), quant(dy)), repeats)
    rows.append(dict(variant="rowwise_casts_x_dy_only", fwd_bwd_ms=cast))
    return rows


def library_rows(a, device, emit) -> None:
    """torchao's Float8Linear (tensorwise, row-wise recipes; compiled) against the bf16 layer, per layer and on the
    FFN block, with the numerics against fp32."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

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
            torch._dynamo.reset()  # each variant compiled afresh: no recompile limit reached (eager fallback)
            fn = torch.compile(mod) if vname != "bf16" else mod
            _, fb, _ = timed(fn, (x,), a.repeats, 3, device)
            emit(group="linear", layer=name, variant=vname, fwd_bwd_ms=round(fb, 4),
                 rel_err_out_dx_dw=errors(fn, mod[0], ref[0], x, g))
    # the FFN block, compiled either way
    for vname in ("bf16", *recipes):
        ffn = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))
        ffn = ffn.to(device).to(torch.bfloat16)
        if vname != "bf16":
            ffn = convert_to_float8_training(ffn, config=recipes[vname])
        torch._dynamo.reset()
        _, fb, _ = timed(torch.compile(ffn), (x_all[768].requires_grad_(),), a.repeats, 3, device)
        emit(group="ffn_compiled", variant=vname, fwd_bwd_ms=round(fb, 4))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only-gemms", action="store_true", help="the `gemms` group alone (no torchao)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_bench: needs a CUDA GPU with FP8 tensor cores (H100 / H200)")
    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []

    def emit(**row):
        row.update(rows_tokens=a.rows, device=torch.cuda.get_device_name(), torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, (k, n) in SHAPES.items():
        for row in gemm_rows(a.rows, k, n, device, a.repeats):
            emit(group="gemms", layer=name, **{**row, "fwd_bwd_ms": round(row["fwd_bwd_ms"], 4)})
    if not a.only_gemms:
        library_rows(a, device, emit)
    write_rows(rows, a.out)


if __name__ == "__main__":
    main()
