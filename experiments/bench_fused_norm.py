#!/usr/bin/env python3
"""The Triton kernels of `models.fused_norm` and `models.fused_gelu` alone, against eager PyTorch (issue 6 goal 1).

Sizes of one packed BERT-base step at seq 128 (default 131072 rows, hidden 768, intermediate 3072), bf16, forward
and forward + backward, as JSON lines with the ms per call:
- `norm`: LayerNorm(dropout(a) + x) on given (N, H) tensors, dropout 0.1 and 0, with the effective bandwidth (bytes
  that must move at the least: forward reads a, x and writes z, y; backward reads dy, z and writes the two input
  gradients);
- `dense_norm`: the end of the feed-forward sub-block with its (4H -> H) GEMM, whose bias the fused kernel adds and
  whose bias gradient it sums (eager: bias in the GEMM, its gradient a reduction of its own);
- `gelu`: bias + GELU alone on the (N, 4H) intermediate activations, fused (`bias_gelu`) or eager, with the effective
  bandwidth;
- `dense_gelu`: the (H -> 4H) GEMM + bias + GELU, fused (`bias_gelu`) or eager;
- `embed`: the packed encoder's embeddings (HF `BertEmbeddings`: word + position + token-type lookups, LayerNorm,
  dropout 0.1, then the cast to bf16; or `models.fused_embed.embed`), backward into the fp32 tables; also `embed`
  with the tables' scatter as `index_add_` (`fused_index_add`, session 12's: notes_speed.md #48).
`--groups` picks some of them (default: all).
Both GEMM groups run under bf16 autocast with fp32 weights, as training does. `--compare-module FILE` adds the
`norm` / `dense_norm` rows of another version of `fused_norm.py` (an A/B of kernel versions in one process).

    python experiments/bench_fused_norm.py --out $OUT/bench_fused_norm.json      # on a GPU
    TRITON_INTERPRET=1 python experiments/bench_fused_norm.py --device cpu --rows 64 --hidden 48 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import timed, write_rows  # noqa: E402

from sessionbert.models import fused_embed, fused_gelu, fused_norm  # noqa: E402
from sessionbert.models.fused_norm import available  # noqa: E402


def _load(path: str):
    """The module at `path` (another version of fused_norm.py), imported under its own name."""
    import importlib.util

    if not Path(path).is_file() or Path(path).suffix != ".py":
        raise SystemExit(f"bench_fused_norm: --compare-module {path}: not a .py file")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GROUPS = ("norm", "gelu", "dense_norm", "dense_gelu", "embed")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=30000, help="word table rows for the `embed` group")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-module", metavar="FILE", help="another fused_norm.py to measure beside this one")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {','.join(GROUPS)}")
    ap.add_argument("--out")
    a_ = ap.parse_args(argv)
    groups = set(a_.groups.split(","))
    if not groups <= set(GROUPS):
        raise SystemExit(f"bench_fused_norm: --groups {a_.groups}: unknown {sorted(groups - set(GROUPS))}; "
                         f"choose among {','.join(GROUPS)}")
    device = torch.device(a_.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not available(device):
        raise SystemExit(f"bench_fused_norm: the Triton kernels do not run on {device} (no Triton, or no GPU and no "
                         f"TRITON_INTERPRET=1)")
    n, h = a_.rows, a_.hidden
    norm = torch.nn.LayerNorm(h).to(device)
    a = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    wide = torch.randn(n, 4 * h, device=device, dtype=dtype, requires_grad=True)  # the intermediate activations
    down, up = torch.nn.Linear(4 * h, h).to(device), torch.nn.Linear(h, 4 * h).to(device)
    tensor_bytes = a.numel() * a.element_size()
    versions = [("fused", fused_norm)] + ([("compare", _load(a_.compare_module))] if a_.compare_module else [])
    rows = []

    def measure(group, name, fn, inputs, p=None, traffic=None):
        """One row; `traffic`: the (forward, backward) bytes that must move at the least, for the bandwidth."""
        if group not in groups:
            return
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            fwd, fb, _ = timed(fn, inputs, a_.repeats, 3, device)
        bwd = fb - fwd
        row = dict(group=group, variant=name, dropout=p, rows=n, hidden=h, dtype=str(dtype)[6:],
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                   fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fb, 4))
        if traffic:
            row.update(fwd_gb_s=round(traffic[0] / fwd / 1e6, 1),
                       bwd_gb_s=round(traffic[1] / bwd / 1e6, 1) if bwd > 0 else None)
        rows.append(row)
        print(json.dumps(row), flush=True)

    norm_bytes = (4 * tensor_bytes,) * 2  # forward reads a, x, writes z, y; backward reads dy, z, writes da, dx
    for p in (0.1, 0.0):
        measure("norm", "eager", lambda a, x: fused_norm.eager_dropout_add_layer_norm(a, x, norm, p), (a, x), p,
                norm_bytes)
        for name, mod in versions:
            measure("norm", name, lambda a, x: mod.dropout_add_layer_norm(a, x, norm, p), (a, x), p, norm_bytes)
    wide_bytes = wide.numel() * wide.element_size()  # bias + GELU: forward reads y, writes the output; backward
    gelu_bytes = (2 * wide_bytes, 3 * wide_bytes)  # reads the output gradient and y, writes y's gradient
    measure("gelu", "eager", lambda y: fused_gelu.eager_bias_gelu(y, up.bias), (wide,), traffic=gelu_bytes)
    measure("gelu", "fused", lambda y: fused_gelu.bias_gelu(y, up.bias), (wide,), traffic=gelu_bytes)
    p = 0.1
    measure("dense_norm", "eager", lambda u, x: fused_norm.eager_dropout_add_layer_norm(down(u), x, norm, p),
            (wide, x), p)
    measure("dense_norm", "fused", lambda u, x: fused_norm.dropout_add_layer_norm(
        F.linear(u, down.weight), x, norm, p, a_bias=down.bias), (wide, x), p)
    for name, mod in versions[1:]:  # an older version without the bias in the kernel: bias in the GEMM
        measure("dense_norm", name, lambda u, x: mod.dropout_add_layer_norm(down(u), x, norm, p), (wide, x), p)
    measure("dense_gelu", "eager", lambda x: F.gelu(up(x)), (x,))
    measure("dense_gelu", "fused", lambda x: fused_gelu.dense_gelu(up, x), (x,))
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    emb = BertEmbeddings(BertConfig(vocab_size=a_.vocab, hidden_size=h, max_position_embeddings=512,
                                    hidden_dropout_prob=0.1)).to(device)
    ids = torch.randint(0, a_.vocab, (n,), device=device)
    pos = torch.arange(n, device=device) % 102  # sessions of 102 tokens (the simulator's mean at seq 128)
    measure("embed", "eager", lambda i, q: emb(input_ids=i[None], position_ids=q[None],
                                               token_type_ids=torch.zeros_like(i)[None])[0].to(dtype), (ids, pos), 0.1)
    measure("embed", "fused", lambda i, q: fused_embed.embed(emb, i, q, dtype), (ids, pos), 0.1)
    scatter = fused_embed._scatter  # session 12's scatter (its padding row left as is: the same work otherwise)
    fused_embed._scatter = lambda table, index, rows, padding_idx=None: torch.zeros(
        table.shape, dtype=torch.float32, device=rows.device).index_add_(0, index, rows)
    try:
        measure("embed", "fused_index_add", lambda i, q: fused_embed.embed(emb, i, q, dtype), (ids, pos), 0.1)
    finally:
        fused_embed._scatter = scatter
    write_rows(rows, a_.out)
    return rows


if __name__ == "__main__":
    main()
