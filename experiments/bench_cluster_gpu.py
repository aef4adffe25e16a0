"""Benchmark: persona clustering (k = 3..9 K-means + sampled cosine silhouette) with our torch K-means.

    python experiments/bench_cluster_gpu.py [--users 1000000] [--dim 768] [--device cuda|cpu] [--json PATH]

Times `sessionbert.personas.cluster.sweep_kmeans(algorithm="torch")`, the call the personas stage makes with
`personas.algorithm=torch` (L2-normalisation on the host, transfer, k-means++ and Lloyd on the device, the
silhouette on a sample of `--silhouette-sample` users), on synthetic user embeddings: `synthetic_user_embeddings`
(a 9-persona Gaussian mixture, see there). Prints one JSON object (and writes it with --json). On a CPU with a
small --users it is a test of the script; the figure the issue asks for is 1M users x 768 on one GPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: primary-persona shares of the simulator's catalogue (console_catalog.yaml, 9 personas)
PERSONA_SHARE = np.array([0.16, 0.14, 0.12, 0.11, 0.10, 0.10, 0.09, 0.09, 0.09])


def synthetic_user_embeddings(n: int, dim: int = 768, seed: int = 0,
                              chunk: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, dim), primary persona (n,)): a stand-in for mean-pooled encoder outputs.

    Like BERT mean-pooled vectors they are anisotropic: a large shared mean direction (cosine similarity of
    any two users is high), 9 persona offsets of unequal shares (the simulator's), 35% of users mixing in a
    secondary persona with weight U(0.15, 0.4) (as the simulator does), plus a rank-16 shared nuisance
    subspace and isotropic noise. Persona offsets are about as large as the noise, so clusters overlap and
    silhouettes are modest, as on real embeddings. Generated in row chunks (float32, no float64 copy).
    """
    rng = np.random.default_rng(seed)
    k = len(PERSONA_SHARE)
    mean = (rng.normal(0, 1, dim) / np.sqrt(dim) * 3.0).astype(np.float32)  # |mean| ~ 3
    offsets = (rng.normal(0, 1, (k, dim)) / np.sqrt(dim)).astype(np.float32) * np.float32(1.2)  # |offset| ~ 1.2
    nuisance = (rng.normal(0, 1, (16, dim)) / np.sqrt(dim)).astype(np.float32)
    primary = rng.choice(k, size=n, p=PERSONA_SHARE / PERSONA_SHARE.sum())
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        p = primary[i:i + m]
        sec = rng.integers(0, k, m)
        w = np.where(rng.random(m) < 0.35, rng.uniform(0.15, 0.4, m), 0.0).astype(np.float32)[:, None]
        xb = mean + (1 - w) * offsets[p] + w * offsets[sec]
        xb += rng.standard_normal((m, 16), dtype=np.float32) @ nuisance * np.float32(0.3)
        xb += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(1.0 / np.sqrt(dim))
        x[i:i + m] = xb
    return x, primary


def versions() -> dict:
    import sklearn
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "sklearn": sklearn.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--silhouette-sample", type=int, default=10000)
    ap.add_argument("--n-init", type=int, default=4, help="K-means restarts per k (personas.n_init)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch
    from sklearn.metrics import adjusted_rand_score

    from sessionbert.personas.cluster import sweep_kmeans

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ks = list(range(3, 10))
    t = time.perf_counter()
    emb, truth = synthetic_user_embeddings(a.users, a.dim, a.seed)
    gen_s = time.perf_counter() - t
    if device.startswith("cuda"):  # CUDA context and kernels warm before the clock starts (one-off costs)
        torch.ones(1, device=device).sum().item()
    t = time.perf_counter()
    out = sweep_kmeans(emb, ks, seed=a.seed, silhouette_sample=a.silhouette_sample, algorithm="torch",
                       n_init=a.n_init, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    res = {
        "bench": "kmeans_sweep_torch", "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "users": a.users, "dim": a.dim, "k_range": ks, "n_init": a.n_init,
        "silhouette_sample": min(a.users, a.silhouette_sample), "kmeans_seconds": round(seconds, 2),
        "per_k_seconds": {str(k): round(v["seconds"], 3) for k, v in out.items()},
        "silhouette": {str(k): round(v["silhouette"], 4) for k, v in out.items()},
        "k_best_silhouette": max(out, key=lambda k: out[k]["silhouette"]),
        "ari_vs_truth_k9": round(float(adjusted_rand_score(truth, out[9]["labels"])), 4),
        "embeddings": "synthetic_user_embeddings (9-persona Gaussian mixture, see experiments/bench_cluster_gpu.py)",
        "generate_seconds": round(gen_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
        "cpus": os.cpu_count(), "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
