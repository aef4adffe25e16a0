#!/usr/bin/env python3
"""Packed vs padded MLM pretraining through the pipeline: same data, batches and seeds, validation MLM loss after
pretraining (issue 6: "same loss curve as the plain path"). The two paths differ only in attention-probability
dropout (0 on the packed path: the varlen kernel has none; model.dropout on the padded one); with dropout off they
compute the same loss and gradients (tests/test_packed.py).

  python experiments/packed_vs_padded.py --experiment ablations_cpu --seeds 0 1 2 \
      --out experiments/results/packed_vs_padded_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="ablations_cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extra", nargs="*", default=[], help="further overrides for both paths")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    from sessionbert.pipeline import run_pipeline
    from tests.conftest import make_cfg

    work = Path(a.work or tempfile.mkdtemp(prefix="packed-vs-padded-"))
    rows = []
    for seed in a.seeds:
        for packed in (False, True):
            ov = [f"experiment={a.experiment}", "stage=pretrain", f"seed={seed}", "logger=csv",
                  f"pretrain.packed={str(packed).lower()}", *a.extra]
            t0 = time.perf_counter()
            m = run_pipeline(make_cfg(work / f"s{seed}-{'packed' if packed else 'padded'}", ov))
            row = {"seed": seed, "path": "packed" if packed else "padded", "val_mlm_loss": m["pretrain"]["mlm_loss"],
                   "pretrain_seconds": m["pretrain"]["seconds"], "wall_seconds": round(time.perf_counter() - t0, 1),
                   "loadavg": round(os.getloadavg()[0], 2), "overrides": ov}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {p: [r["val_mlm_loss"] for r in rows if r["path"] == p] for p in ("padded", "packed")}
    import numpy as np

    summary = {p: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)} for p, v in by.items()}
    diffs = [b - c for b, c in zip(by["packed"], by["padded"])]
    out = {"command": " ".join(["python", *sys.argv]), "runs": rows, "summary": summary,
           "packed_minus_padded": [round(d, 4) for d in diffs], "cpus": os.cpu_count()}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
