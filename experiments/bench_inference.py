"""Benchmark: users/s of `sessionbert recommend` (the command, end to end: read, validate, serialise, tokenise,
encode, recommend, personas, write Parquet) on N users' last sessions.

    python experiments/bench_inference.py [--run RUN_DIR] [--users 1000000] [--base-users 10000]
        [--last-sessions 8] [--workers -1] [--device cuda] [--train-args "trainer=gpu"] [--out FILE]

RUN_DIR is a finished run; without --run a smoke run (`experiment=smoke` plus --train-args) is trained into
--work first. Input: --base-users users simulated with the `tiny` simulator settings and a seed other than the
run's (new users), each cut to its last --last-sessions sessions (0 = all), then repeated with distinct user and
session ids ("r0001-u...") up to --users users, written as a Parquet file sorted by user_id (and their billing,
repeated the same way): the repeats have the same token ids, but every user is read, validated, serialised,
tokenised, encoded and scored on its own; nothing is cached across users except the tokenised distinct texts.
--compare-users N also times N users with --workers 0 (everything in the main process) for the speed-up.
Prints the command, then one JSON line per measurement; --out appends them to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_input(work: Path, users: int, base_users: int, last_sessions: int, seed: int) -> tuple[Path, Path, dict]:
    """events.parquet / billing.parquet of `users` users (see the module docstring); cached in `work`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = work / f"input-{users}-{base_users}-{last_sessions}-{seed}"
    ev_path, bi_path, info_path = out / "events.parquet", out / "billing.parquet", out / "info.json"
    if info_path.exists():
        return ev_path, bi_path, json.loads(info_path.read_text())
    from sessionbert.data.catalog import load_catalog
    from sessionbert.data.simulator import sim_config, simulate_to_dir

    t0 = time.perf_counter()
    sim_dir = work / f"sim-{base_users}-{seed}"
    if not (sim_dir / "events.parquet").exists():
        simulate_to_dir(sim_config("tiny", seed=seed, n_users=base_users), sim_dir, load_catalog(None),
                        write_stats=False)
    ev = pq.read_table(sim_dir / "events.parquet")
    bi = pq.read_table(sim_dir / "billing.parquet")
    ev = ev.take(pc.sort_indices(ev, [("user_id", "ascending"), ("timestamp", "ascending")]))
    if last_sessions:
        # each user's last `last_sessions` sessions (by first event)
        df = ev.select(["user_id", "session_id", "timestamp"]).to_pandas()
        first = df.groupby("session_id", sort=False)["timestamp"].min()
        sess = df.drop_duplicates("session_id")[["user_id", "session_id"]].assign(start=lambda d: d["session_id"].map(first))
        sess = sess.sort_values(["user_id", "start"], kind="stable")
        keep = set(sess.groupby("user_id", sort=False).tail(last_sessions)["session_id"])
        ev = ev.filter(pa.array(df["session_id"].isin(keep).to_numpy()))
    bi = bi.take(pc.sort_indices(bi, [("user_id", "ascending")]))
    base_n = pc.count_distinct(ev.column("user_id")).as_py()
    reps = -(-users // base_n)
    out.mkdir(parents=True, exist_ok=True)
    ev_users = ev.column("user_id")
    bi_users = bi.column("user_id")
    # the first `users` users: whole repeats, then the first users of the last repeat
    last_users = users - (reps - 1) * base_n
    u_sorted = pc.unique(ev_users)
    cut_user = u_sorted[last_users - 1].as_py()
    with pq.ParquetWriter(ev_path, ev.schema) as we, pq.ParquetWriter(bi_path, bi.schema) as wb:
        for r in range(reps):
            e, b = ev, bi
            if r == reps - 1:
                e = ev.filter(pc.less_equal(ev_users, cut_user))
                b = bi.filter(pc.less_equal(bi_users, cut_user))
            pre = f"r{r:05d}-"
            e = e.set_column(e.schema.get_field_index("user_id"), "user_id",
                             pc.binary_join_element_wise(pre, e.column("user_id"), ""))
            e = e.set_column(e.schema.get_field_index("session_id"), "session_id",
                             pc.binary_join_element_wise(pre, e.column("session_id"), ""))
            b = b.set_column(b.schema.get_field_index("user_id"), "user_id",
                             pc.binary_join_element_wise(pre, b.column("user_id"), ""))
            we.write_table(e)
            wb.write_table(b)
    info = {"users": users, "base_users": base_n, "repeats": reps, "last_sessions": last_sessions,
            "events": pq.ParquetFile(ev_path).metadata.num_rows, "billing_rows": pq.ParquetFile(bi_path).metadata.num_rows,
            "row_groups": pq.ParquetFile(ev_path).metadata.num_row_groups,
            "events_mb": round(ev_path.stat().st_size / 2**20, 1), "seconds_to_make": round(time.perf_counter() - t0, 1)}
    sessions = pc.count_distinct(ev.column("session_id")).as_py()
    info["sessions"] = int(round(sessions * users / base_n))
    info_path.write_text(json.dumps(info))
    return ev_path, bi_path, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="finished run dir; default: train a smoke run into --work")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "sessionbert-bench-inference"))
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--base-users", type=int, default=2000)
    ap.add_argument("--last-sessions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu / cuda")
    ap.add_argument("--workers", type=int, default=-1, help="as `sessionbert recommend --workers` (-1: its default)")
    ap.add_argument("--batch-rows", type=int, default=1_000_000)
    ap.add_argument("--compare-users", type=int, default=0, help="also time this many users with --workers 0")
    ap.add_argument("--packed", action="store_true",
                    help="also time the same users with `sessionbert recommend --packed` (padding-free encoder pass)")
    ap.add_argument("--train-args", default="", help="extra overrides for the run trained when --run is not given")
    ap.add_argument("--out", help="append the command and the result lines to this file")
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    work = Path(a.work)
    run_dir = Path(a.run) if a.run else work / "run"
    if not a.run and not (run_dir / "run_config.yaml").exists():
        from tests.conftest import make_cfg

        from sessionbert.pipeline import run_pipeline

        run_pipeline(make_cfg(work, ["experiment=smoke", *a.train_args.split()]))
    lines = []

    def measure(users: int, workers: int, packed: bool = False) -> dict:
        ev, bi, info = make_input(work, users, a.base_users, a.last_sessions, a.seed)
        out = work / f"recs-{users}-{workers}.parquet"
        load0 = os.getloadavg()[0]
        # a fresh process per measurement, as a user runs it (thread pools and allocator state not carried over)
        cmd = [sys.executable, "-m", "sessionbert.cli", "recommend", "--run", str(run_dir), "--events", str(ev),
               "--billing", str(bi), "--out", str(out), "--device", a.device, "--workers", str(workers),
               "--batch-rows", str(a.batch_rows)] + (["--packed"] if packed else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sessionbert recommend exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        summary = [ln for ln in proc.stderr.splitlines() if ln.startswith("sessionbert recommend:")][-1]
        print(summary)
        secs = float(re.search(r" in ([0-9.]+) s on ", summary).group(1))
        import pyarrow.parquet as pq

        n = pq.ParquetFile(out).metadata.num_rows
        from sessionbert.inference import SessionBERT

        m = SessionBERT.from_run(run_dir, device="cpu")
        res = {"device": a.device, "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
               "users": n, "input": info, "batch_rows": a.batch_rows,
               "workers": workers if workers >= 0 else (max(1, min(32, (os.cpu_count() or 2) - 2))
                                                         if a.device == "cuda" else 0),
               "packed": packed, "seconds": round(secs, 2), "users_per_s": round(n / secs, 1),
               "wall_seconds_with_startup": round(wall, 2),
               "sessions_per_s": round(info["sessions"] / secs, 1), "cpus": os.cpu_count(),
               "loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
               "seq_len": m.seq_len, "hidden": m.module.encoder.config.hidden_size,
               "layers": m.module.encoder.config.num_hidden_layers, "torch": torch.__version__,
               "what": "sessionbert recommend in a fresh process: seconds = its own summary line (reading, "
                       "validating, serialising, tokenising, encoding, recommending, personas, writing Parquet; "
                       "after the model is loaded); wall_seconds_with_startup adds interpreter start, imports and "
                       "model load"}
        os.unlink(out)
        return res

    if a.compare_users:
        lines.append(measure(a.compare_users, 0))
        lines.append(measure(a.compare_users, a.workers))
    lines.append(measure(a.users, a.workers))
    if a.packed:
        lines.append(measure(a.users, a.workers, packed=True))
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    print(cmd)
    for r in lines:
        print(json.dumps(r))
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(cmd + "\n" + "".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
