"""Benchmark (issue 6, goals 5 and 6): CPU prep of 1M sessions and persona clustering of 1M user embeddings.

    python experiments/bench_cpu.py [--sessions 1000000] [--users 1000000] [--scaling 250000]
                                    [--json experiments/results/bench_cpu.json] [--md experiments/results/bench_cpu.md]

1. Prep (each size in its own child process, so its peak RSS is its own): simulate `--sessions` console
   sessions to Parquet (`simulate_to_dir`, streaming, no data_stats), then `sessionbert.data.prep.prep_shards`:
   stream the events in record batches, serialise, train WordPiece on a bounded sample of training sessions,
   encode with the Rust tokenizer, write fixed-size token-id shards (seq_len 128). Time = wall clock of both;
   peak memory = ru_maxrss of the simulator (a forked process) and of the prep, the larger reported.
   `--scaling N` also preps N sessions, to show the peak does not grow
   with the data (streaming).
2. Clustering (another child): k = 3..9 MiniBatchKMeans (scikit-learn, n_init 4, batch 4096) on `--users`
   synthetic 768-d user embeddings (`bench_cluster_gpu.synthetic_user_embeddings`: a 9-persona Gaussian
   mixture) via `sweep_kmeans(algorithm="minibatch")`: L2-normalised (cosine), silhouette on a fixed sample
   of `--silhouette-sample` users. Time = the sweep (embedding generation excluded, reported apart).

Writes one JSON (keys prep_1m_seconds, prep_1m_peak_rss_gb, kmeans_1m_cpu_seconds when run at 1M) and a short
markdown table. The 2 CPU cores may be shared: the load average before and after each part is recorded;
compare only runs taken with a low load.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

#: Sessions per user of the default simulator configuration (as experiments/bench_simulator.py).
SESSIONS_PER_USER = 13.26


def _peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: what the work costs whatever the
    load (on an idle machine wall time ~ this / the cores it keeps busy)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime, 2)


def child_prep(sessions: int, seq_len: int, tokenizer_sample: int, seed: int) -> dict:
    from sessionbert.data.prep import prep_shards
    from sessionbert.data.simulator import sim_config, simulate_to_dir

    cfg = sim_config("default", seed=seed, n_users=max(1, round(sessions / SESSIONS_PER_USER)))
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as tmp:
        t0 = time.perf_counter()
        # the simulator in a forked process: its peak and the prep's are then measured apart
        sim = multiprocessing.get_context("fork").Process(
            target=simulate_to_dir, args=(cfg, Path(tmp) / "data"), kwargs={"write_stats": False})
        sim.start()
        sim.join()
        if sim.exitcode:
            raise SystemExit(f"simulate_to_dir failed (exit code {sim.exitcode})")
        t1 = time.perf_counter()
        peak_sim = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)
        m = prep_shards(Path(tmp) / "data" / "events.parquet", Path(tmp) / "shards",
                        Path(tmp) / "data" / "billing.parquet", seq_len=seq_len, tokenizer_sample=tokenizer_sample)
        t2 = time.perf_counter()
        shard_mb = sum(f.stat().st_size for f in (Path(tmp) / "shards").glob("shard-*.parquet")) / 2**20
    return {
        "sessions": m["n_sessions"], "events": m["n_events"], "tokens": m["n_tokens"], "users": cfg.n_users,
        "seconds": round(t2 - t0, 2), "simulate_seconds": round(t1 - t0, 2), "prep_seconds": round(t2 - t1, 2),
        "cpu_seconds": _cpu_seconds(),
        "prep_steps_seconds": m["seconds"], "peak_rss_gb": max(peak_sim, _peak_gb()),
        "peak_rss_gb_simulate": peak_sim, "peak_rss_gb_prep": _peak_gb(),
        "shards": len(m["shards"]), "shard_sessions": m["shard_sessions"], "shards_mb": round(shard_mb, 1),
        "seq_len": seq_len, "tokenizer_sample_sessions": m["tokenizer_note"]["sample_sessions"],
        "vocab_size": m["tokenizer_note"]["vocab_size"], "windows": m["windows"],
    }


def child_cluster(users: int, dim: int, sample: int, n_init: int, seed: int) -> dict:
    from bench_cluster_gpu import synthetic_user_embeddings
    from sklearn.metrics import adjusted_rand_score

    from sessionbert.personas.cluster import sweep_kmeans

    t0 = time.perf_counter()
    emb, truth = synthetic_user_embeddings(users, dim, seed)
    t1 = time.perf_counter()
    out = sweep_kmeans(emb, list(range(3, 10)), seed=seed, silhouette_sample=sample, algorithm="minibatch",
                       n_init=n_init)
    t2 = time.perf_counter()
    return {
        "users": users, "dim": dim, "algorithm": "sklearn MiniBatchKMeans (batch_size 4096)", "n_init": n_init,
        "k_range": list(range(3, 10)), "silhouette_sample": min(users, sample), "seconds": round(t2 - t1, 2),
        "cpu_seconds_incl_generation": _cpu_seconds(),
        "generate_seconds": round(t1 - t0, 2),
        "per_k_seconds": {str(k): round(v["seconds"], 2) for k, v in out.items()},
        "silhouette": {str(k): round(v["silhouette"], 4) for k, v in out.items()},
        "k_best_silhouette": max(out, key=lambda k: out[k]["silhouette"]),
        "ari_vs_truth_k9": round(float(adjusted_rand_score(truth, out[9]["labels"])), 4),
        "peak_rss_gb": _peak_gb(),
        "embeddings": "synthetic_user_embeddings: 9-persona Gaussian mixture in 768-d "
                      "(experiments/bench_cluster_gpu.py)",
    }


def _run_child(args: list[str]) -> dict:
    before = os.getloadavg()
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"child {args} failed with exit code {r.returncode}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["loadavg_1m_before_after"] = [round(before[0], 2), round(os.getloadavg()[0], 2)]
    return res


def _versions() -> dict:
    import numpy
    import pyarrow
    import sklearn
    import tokenizers
    import torch

    return {"python": platform.python_version(), "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "tokenizers": tokenizers.__version__, "sklearn": sklearn.__version__, "torch": torch.__version__}


def _machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(mem, 1), "platform": platform.platform()}


def _markdown(res: dict) -> str:
    v, mc = res["versions"], res["machine"]
    lines = [
        "# CPU prep and clustering benchmark (issue 6, goals 5 and 6)", "",
        f"Machine: {mc['cpus']} x {mc['cpu']}, {mc['memory_gb']} GB RAM; {res['date']}; python {v['python']}, "
        f"numpy {v['numpy']}, pyarrow {v['pyarrow']}, tokenizers {v['tokenizers']}, scikit-learn {v['sklearn']}, "
        f"torch {v['torch']}. Command: `{res['command']}`.", "",
        "| step | size | wall seconds | peak RSS (GB) | target | load avg (1 min) before / after |",
        "|---|---|---|---|---|---|",
    ]
    for p in res["prep"]:
        s = p["prep_steps_seconds"]
        lines.append(f"| prep: simulate + serialise + tokenize + write shards | {p['sessions']:,} sessions, "
                     f"{p['events']:,} events | **{p['seconds']}** (simulate {p['simulate_seconds']}, prep "
                     f"{p['prep_seconds']}: read+serialise {s['read_serialise']}, tokenizer training "
                     f"{s['tokenizer_train']}, encode {s['encode_assemble']}, write {s['write']}; CPU time "
                     f"{p.get('cpu_seconds')} s) | "
                     f"**{p['peak_rss_gb']}** (simulate {p['peak_rss_gb_simulate']}, prep {p['peak_rss_gb_prep']}) "
                     f"| <= 60 s, <= 4 GB at 1M | {p['loadavg_1m_before_after']} |")
    c = res["cluster"]
    if c:
        lines.append(f"| clustering: k = 3..9 MiniBatchKMeans + cosine silhouette (sample {c['silhouette_sample']:,}) "
                     f"| {c['users']:,} users x {c['dim']} | **{c['seconds']}** | {c['peak_rss_gb']} | <= 300 s at 1M "
                     f"| {c['loadavg_1m_before_after']} |")
        lines += ["", f"Clustering per k (s): {c['per_k_seconds']}; silhouette: {c['silhouette']}; "
                  f"ARI vs the synthetic personas at k=9: {c['ari_vs_truth_k9']}. Embeddings: {c['embeddings']}; "
                  f"their generation ({c['generate_seconds']} s) is not timed."]
    lines += ["", "Prep writes token-id shards (Parquet, zstd, 100k sessions each, input_ids truncated to seq_len "
              f"{res['prep'][0]['seq_len']}); the WordPiece tokenizer is trained on the first "
              f"{res['prep'][0]['tokenizer_sample_sessions']:,} training-window sessions. The simulator writes no "
              "data_stats here. Timings on a shared machine are only comparable at a low load average."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1_000_000, help="sessions to simulate and prep (0: skip prep)")
    ap.add_argument("--scaling", type=int, nargs="*", default=[], help="also prep these sizes (memory vs size)")
    ap.add_argument("--users", type=int, default=1_000_000, help="user embeddings to cluster (0: skip)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--silhouette-sample", type=int, default=10000)
    ap.add_argument("--n-init", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tokenizer-sample", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--child", choices=["prep", "cluster"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child == "prep":
        print(json.dumps(child_prep(a.sessions, a.seq_len, a.tokenizer_sample, a.seed)))
        return
    if a.child == "cluster":
        print(json.dumps(child_cluster(a.users, a.dim, a.silhouette_sample, a.n_init, a.seed)))
        return

    common = ["--seq-len", str(a.seq_len), "--tokenizer-sample", str(a.tokenizer_sample), "--seed", str(a.seed)]
    prep = []
    for n in sorted(set(a.scaling)) + ([a.sessions] if a.sessions else []):
        prep.append(_run_child(["--child", "prep", "--sessions", str(n), *common]))
        print(json.dumps({"prep": prep[-1]}), flush=True)
    cluster = None
    if a.users:
        cluster = _run_child(["--child", "cluster", "--users", str(a.users), "--dim", str(a.dim), "--silhouette-sample",
                              str(a.silhouette_sample), "--n-init", str(a.n_init), "--seed", str(a.seed)])
        print(json.dumps({"cluster": cluster}), flush=True)
    res: dict = {"bench": "bench_cpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python " + " ".join([f"experiments/{Path(__file__).name}", *sys.argv[1:]]),
                 "machine": _machine(), "versions": _versions()}
    if prep and a.sessions:
        main_run = prep[-1]
        res |= {"prep_seconds": main_run["seconds"], "prep_peak_rss_gb": main_run["peak_rss_gb"],
                "prep_sessions": main_run["sessions"]}
        if a.sessions == 1_000_000:
            res |= {"prep_1m_seconds": main_run["seconds"], "prep_1m_peak_rss_gb": main_run["peak_rss_gb"]}
    if cluster:
        res |= {"kmeans_cpu_seconds": cluster["seconds"], "kmeans_users": cluster["users"],
                "silhouette_sample": cluster["silhouette_sample"]}
        if a.users == 1_000_000 and a.dim == 768:
            res["kmeans_1m_cpu_seconds"] = cluster["seconds"]
    res |= {"prep": prep, "cluster": cluster}
    print(json.dumps({k: v for k, v in res.items() if k not in ("prep", "cluster")}))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    if a.md and prep:
        a.md.write_text(_markdown(res))


if __name__ == "__main__":
    main()
