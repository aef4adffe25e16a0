#!/usr/bin/env python3
"""`LayerNorm(dropout(a) + x)` alone: the Triton kernels of `models.fused_norm` against eager PyTorch (issue 6 goal 1).

One (N, H) bf16 tensor pair (default: one packed BERT-base step at seq 128, 131072 x 768), forward and forward +
backward, dropout 0.1 and 0, with the ms per call and the effective bandwidth of each (bytes that must move at the
least: forward reads a, x and writes z, y; backward reads dy, z and writes the two input gradients). Prints JSON lines.

    python experiments/bench_fused_norm.py --out $OUT/bench_fused_norm.json      # on a GPU
    TRITON_INTERPRET=1 python experiments/bench_fused_norm.py --device cpu --rows 64 --hidden 48 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import timed, write_rows  # noqa: E402

from sessionbert.models.fused_norm import available, dropout_add_layer_norm, eager_dropout_add_layer_norm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    a_ = ap.parse_args(argv)
    device = torch.device(a_.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not available(device):
        raise SystemExit(f"bench_fused_norm: the Triton kernels do not run on {device} (no Triton, or no GPU and no "
                         f"TRITON_INTERPRET=1)")
    norm = torch.nn.LayerNorm(a_.hidden).to(device)
    a = torch.randn(a_.rows, a_.hidden, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(a_.rows, a_.hidden, device=device, dtype=dtype, requires_grad=True)
    tensor_bytes = a.numel() * a.element_size()
    rows = []
    for p in (0.1, 0.0):
        for name, fn in (("eager", eager_dropout_add_layer_norm), ("fused", dropout_add_layer_norm)):
            fwd, fb, _ = timed(lambda a, x: fn(a, x, norm, p), (a, x), a_.repeats, 3, device)
            bwd = fb - fwd
            row = dict(variant=name, dropout=p, rows=a_.rows, hidden=a_.hidden, dtype=str(dtype)[6:],
                       device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       torch=torch.__version__, fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fb, 4),
                       fwd_gb_s=round(4 * tensor_bytes / fwd / 1e6, 1), bwd_gb_s=round(4 * tensor_bytes / bwd / 1e6, 1)
                       if bwd > 0 else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_rows(rows, a_.out)
    return rows


if __name__ == "__main__":
    main()
