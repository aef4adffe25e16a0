"""Benchmark: stream N simulated console sessions to parquet (simulate_to_dir) and report time and memory.

    python experiments/bench_simulator.py --sessions 1000000 [--seed 0] [--out DIR] [--stats] [--workers N]

Prints one JSON line: seconds, peak RSS (resource.getrusage, this process; --workers processes not counted),
sessions, events, rate and the parquet sizes. The number of users is chosen from the default size's sessions
per user, so the session count lands near --sessions. A benchmark, not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402

from sessionbert.data.catalog import load_catalog  # noqa: E402
from sessionbert.data.simulator import sim_config, simulate_to_dir  # noqa: E402

#: Sessions per user of the default configuration (measured: 23,871 sessions / 1,800 users, seed 0).
SESSIONS_PER_USER = 13.26


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one, removed)")
    ap.add_argument("--stats", action="store_true", help="also compute data_stats.json (on <= 20k users)")
    ap.add_argument("--workers", type=int, default=0, help="simulate chunks in this many processes (0: serial)")
    a = ap.parse_args()

    n_users = max(1, round(a.sessions / SESSIONS_PER_USER))
    cfg = sim_config("default", seed=a.seed, n_users=n_users)
    catalog = load_catalog()
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        t = time.perf_counter()
        paths = simulate_to_dir(cfg, out, catalog, write_stats=a.stats, workers=a.workers)
        seconds = time.perf_counter() - t
        meta = {k: pq.ParquetFile(p).metadata.num_rows for k, p in paths.items() if p.suffix == ".parquet"}
        sizes = {k: round(p.stat().st_size / 2**20, 1) for k, p in paths.items() if p.suffix == ".parquet"}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({
        "bench": "simulate_to_dir", "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1),
        "n_users": n_users, "n_sessions": meta["sessions"], "n_events": meta["events"],
        "n_billing_rows": meta["billing"], "sessions_per_s": round(meta["sessions"] / seconds),
        "events_per_s": round(meta["events"] / seconds), "chunk_users": cfg.chunk_users, "stats": a.stats,
        "workers": a.workers,
        "parquet_mb": sizes, "cpus": os.cpu_count(), "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
