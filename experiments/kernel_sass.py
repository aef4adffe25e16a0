#!/usr/bin/env python3
"""Static instruction counts of the row-wise Triton kernels, compiled offline for an H100 / H200 (sm_90), no GPU needed.

The LayerNorm, bias + GELU and embeddings kernels (`models.fused_norm`, `fused_gelu`, `fused_embed`) move 4-8 bytes per
element; when they execute more instructions per element than the SMs issue in the time the bytes take, they are
bound by instructions, not bandwidth (notes_speed.md #51, #52). Triton's wheel ships `ptxas` and `nvdisasm`, so each
kernel is compiled here for sm_90 at one fixed tile (one tile per program, 4 warps; BERT-base widths) and its SASS
counted: instructions per element a thread handles, MUFU (special-function unit: exp2, reciprocal) per element, and
the most frequent opcodes. Static counts: every instruction once, whatever the branches do at run time; a tool to
compare two versions of a kernel before spending GPU time, not a measurement of speed.

    python experiments/kernel_sass.py                                # this tree
    python experiments/kernel_sass.py --tree .bench/old_s13c         # another checkout's sessionbert/, to compare
    python experiments/kernel_sass.py --kernels gelu_fwd,gelu_bwd --json out.json
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pointer arguments that hold fp32 (parameters, statistics, partial sums, the tables' gradients) or int64 (ids);
# every other capitalised argument is a bf16 activation
FP32 = {"AB", "W", "B", "Mean", "Rstd", "DWp", "DBp", "DABp", "DTp", "WE", "PE", "TE", "DE"}
INT64 = {"IDS", "POS"}
UINT8 = {"KB"}  # the dropout mask as bits (the lead in results/kernel_sass_s14/dropout_bits.patch, via --tree)
SCALARS = {"n_rows": "i32", "n_cols": "i32", "seed": "i32", "eps": "fp32", "p": "fp32"}
# (module, kernel, constexprs, elements per tile row): BERT-base widths (768 -> BLOCK 1024; 3072 in column blocks of
# 1024), one tile per program (ROWS = RB), 4 warps
KERNELS = {
    "norm_fwd_dropout": ("fused_norm", "_fwd_kernel",
                         dict(BLOCK=1024, RB=4, DROPOUT=True, HAS_AB=False, ROWS=4, PREFETCH=False)),
    "norm_fwd": ("fused_norm", "_fwd_kernel",
                 dict(BLOCK=1024, RB=4, DROPOUT=False, HAS_AB=False, ROWS=4, PREFETCH=False)),
    "norm_bwd_dropout": ("fused_norm", "_bwd_kernel",
                         dict(BLOCK=1024, RB=4, ROWS=4, DROPOUT=True, HAS_AB=False, PREFETCH=False)),
    "gelu_fwd": ("fused_gelu", "_fwd_kernel", dict(RB=8, BC=1024, ROWS=8, PREFETCH=False)),
    "gelu_bwd": ("fused_gelu", "_bwd_kernel", dict(RB=8, BC=1024, ROWS=8, PREFETCH=False)),
    "embed_fwd_dropout": ("fused_embed", "_fwd_kernel", dict(BLOCK=1024, RB=4, DROPOUT=True)),
    "embed_bwd_dropout": ("fused_embed", "_bwd_kernel", dict(BLOCK=1024, RB=4, ROWS=4, DROPOUT=True)),
}
WARPS = 4


def _signature(fn, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        elif name[0].isupper():
            sig[name] = "*fp32" if name in FP32 else "*i64" if name in INT64 else "*u8" if name in UINT8 else "*bf16"
        else:
            raise SystemExit(f"kernel_sass: no type for argument {name!r} of {fn.__name__}: add it to SCALARS")
    return sig


def count(module, kernel: str, consts: dict) -> dict:
    """Static SASS counts of `module.kernel` compiled for sm_90 with `consts`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(module, kernel).fn
    compiled = triton.compile(ASTSource(fn=fn, signature=_signature(fn, consts), constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    per_thread = consts["RB"] * consts.get("BLOCK", consts.get("BC", 0)) / (32 * WARPS)
    total = sum(ops.values())
    return dict(instructions=total, per_element=round(total / per_thread, 1),
                mufu_per_element=round(ops["MUFU"] / per_thread, 2), top=ops.most_common(8))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=str(ROOT), help="a checkout whose sessionbert/ to compile (default: this one)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {','.join(KERNELS)}")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    names = a.kernels.split(",")
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        raise SystemExit(f"kernel_sass: --kernels {unknown}: choose among {','.join(KERNELS)}")
    tree = Path(a.tree).resolve()
    if not (tree / "sessionbert" / "models").is_dir():
        raise SystemExit(f"kernel_sass: --tree {a.tree}: no sessionbert/models there")
    # import the tree asked for, not a sessionbert imported before; put the caller's modules back afterwards
    ours = lambda m: m == "sessionbert" or m.startswith("sessionbert.")  # noqa: E731
    saved = {m: sys.modules.pop(m) for m in [m for m in sys.modules if ours(m)]}
    sys.path.insert(0, str(tree))
    rows = []
    try:
        for name in names:
            module, kernel, consts = KERNELS[name]
            mod = importlib.import_module(f"sessionbert.models.{module}")
            rows.append(dict(kernel=name, tree=str(tree), **count(mod, kernel, consts)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        sys.path.remove(str(tree))
        for m in [m for m in sys.modules if ours(m)]:
            del sys.modules[m]
        sys.modules.update(saved)
    if a.json:
        Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
