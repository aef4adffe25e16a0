"""Benchmark: users/s of the inference API (`SessionBERT.predict_batches`) on CPU, over N simulated users.

    python experiments/bench_inference.py --run RUN_DIR [--users 1000] [--batch-users 256] [--seed 1] [--out FILE]

RUN_DIR is a finished run (e.g. `python train.py experiment=smoke hydra.run.dir=/tmp/smoke`, the tiny model);
without --run a smoke run is trained first into --work. The N users are simulated with the `tiny` simulator
settings and a seed other than the run's (so they are new users). Persona, top-5 new services and next pages are
computed for every user with all their sessions (no cut-off). Prints the command, then one JSON line: users,
sessions, events, seconds (scoring only: reading and simulation excluded), users/s, sessions/s, torch threads,
load average before and after.
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="finished run dir; default: train a smoke run into --work")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sessionbert-bench-inference"))
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--batch-users", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu / cuda")
    ap.add_argument("--train-args", default="", help="extra overrides for the run trained when --run is not given")
    ap.add_argument("--out", help="append the command and the result line to this file")
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pandas as pd
    import torch

    from sessionbert.data.catalog import load_catalog
    from sessionbert.data.simulator import sim_config, simulate_to_dir
    from sessionbert.inference import SessionBERT

    work = Path(a.work)
    run_dir = Path(a.run) if a.run else work / "run"
    if not a.run and not (run_dir / "run_config.yaml").exists():
        from tests.conftest import make_cfg

        from sessionbert.pipeline import run_pipeline

        run_pipeline(make_cfg(work, ["experiment=smoke", *a.train_args.split()]))
    sim_dir = work / f"sim-{a.users}-{a.seed}"
    if not (sim_dir / "events.parquet").exists():
        simulate_to_dir(sim_config("tiny", seed=a.seed, n_users=a.users), sim_dir, load_catalog(None),
                        write_stats=False)
    events = pd.read_parquet(sim_dir / "events.parquet")
    billing = pd.read_parquet(sim_dir / "billing.parquet")
    model = SessionBERT.from_run(run_dir, device=a.device)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    n = 0
    for df in model.predict_batches(events, billing, batch_users=a.batch_users):
        n += len(df)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    res = {"device": str(model.device), "users": n, "sessions": int(events["session_id"].nunique()), "events": len(events),
           "batch_users": a.batch_users, "seconds": round(secs, 2), "users_per_s": round(n / secs, 1),
           "sessions_per_s": round(events["session_id"].nunique() / secs, 1), "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
           "seq_len": model.seq_len, "hidden": model.module.encoder.config.hidden_size,
           "layers": model.module.encoder.config.num_hidden_layers}
    line = json.dumps(res)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    print(cmd)
    print(line)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(cmd + "\n" + line + "\n")


if __name__ == "__main__":
    main()
