"""K-means on L2-normalised user embeddings (cosine geometry) with cosine silhouette, for each k.

Algorithms (`personas.algorithm`): `kmeans` and `minibatch` are scikit-learn's (CPU); `torch` is our own
K-means in torch (k-means++ init, Lloyd iterations with batched distances on the device: a GPU when there is
one) because scikit-learn has no GPU path. All three run on the same unit vectors and report the cosine
silhouette on the same random sample of users (sklearn's `silhouette_score(sample_size=, random_state=)`
sample), so their numbers are comparable.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans, kmeans_plusplus
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import normalize
from sklearn.utils import check_random_state

ALGORITHMS = ("kmeans", "minibatch", "torch")


def silhouette_sample_indices(n: int, sample: int, seed: int) -> np.ndarray | None:
    """The users `silhouette_score(sample_size=sample, random_state=seed)` would draw; None = all of them."""
    if sample >= n:
        return None
    return check_random_state(seed).permutation(n)[:sample]


def sweep_kmeans(emb: np.ndarray, ks: list[int], seed: int = 0, silhouette_sample: int = 10000,
                 algorithm: str = "kmeans", n_init: int = 4, device: str | torch.device | None = None,
                 batch_size: int = 4096) -> dict[int, dict]:
    """For each k: labels, centres (unit norm) and the cosine silhouette.

    K-means on unit vectors minimises 1 - cos (spherical K-means up to the centre normalisation), which is
    the paper's "K-means with cosine similarity". The silhouette uses a fixed random sample of
    `silhouette_sample` users (exact when there are fewer), stated in the metrics; its distance matrix is
    computed once and shared by every k. `device` (torch only): None = CUDA when available, else CPU.
    `batch_size`: MiniBatchKMeans' batch.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"personas.algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    x = normalize(np.asarray(emb, dtype=np.float32))
    if len(x) <= max(ks):
        raise ValueError(f"personas: {len(x)} users cannot be split into k={max(ks)} clusters")
    idx = silhouette_sample_indices(len(x), silhouette_sample, seed)
    if algorithm == "torch":
        return _sweep_torch(x, ks, seed, idx, n_init, device)
    xs = x if idx is None else x[idx]
    dist = np.clip(1.0 - xs @ xs.T, 0.0, 2.0)  # cosine distances of the sample (unit rows), as sklearn's
    np.fill_diagonal(dist, 0.0)
    out = {}
    for k in ks:
        t0 = time.perf_counter()
        if algorithm == "kmeans":
            km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        else:
            km = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed, batch_size=batch_size,
                                 init=_kmeanspp_float64)
        labels = km.fit_predict(x)
        ls = labels if idx is None else labels[idx]
        sil = silhouette_score(dist, ls, metric="precomputed")
        out[k] = {"labels": labels, "centers": normalize(km.cluster_centers_), "silhouette": float(sil),
                  "inertia": float(km.inertia_), "seconds": time.perf_counter() - t0}
    return out


def _kmeanspp_float64(x: np.ndarray, n_clusters: int, random_state) -> np.ndarray:
    """sklearn's k-means++ run on a float64 copy of MiniBatchKMeans' init subset (3 x batch_size rows): on
    float32 sklearn computes each distance block through a chunked float64 upcast, which made the init 60% of
    a 1M x 768 fit; the same algorithm on float64 is one BLAS call per step."""
    return kmeans_plusplus(np.asarray(x, dtype=np.float64), n_clusters, random_state=random_state)[0]


def assign(emb: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre by cosine, and that similarity: (N,), (N,)."""
    sim = normalize(np.asarray(emb, dtype=np.float32)) @ centers.T  # (N, k)
    return sim.argmax(1), sim.max(1)


# ------------------------------------------------------------------------------------------ torch K-means
# Written here because scikit-learn has no GPU path. It follows sklearn's KMeans (Lloyd): greedy k-means++
# init with 2 + log(k) local trials, tolerance relative to the data's mean variance, empty clusters moved to
# the points farthest from their centres, a final assignment step consistent with the returned centres,
# best of n_init runs by inertia. Tested against sklearn (ARI ~1 on separated blobs, equal silhouettes).

def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sqdist_to(x: torch.Tensor, xn: torch.Tensor, pts: torch.Tensor, rows: int) -> torch.Tensor:
    """Squared euclidean distances of every row of x (squared norms xn) to each of `pts`: (N, P), in row blocks
    (x @ pts.T is the only pass over x)."""
    pn = (pts * pts).sum(1)
    out = torch.empty(len(x), len(pts), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), rows):
        out[i:i + rows] = (pn[None, :] - 2.0 * (x[i:i + rows] @ pts.T) + xn[i:i + rows, None]).clamp_min_(0)
    return out


def _assign(x: torch.Tensor, xn: torch.Tensor, c: torch.Tensor, rows: int):
    """Nearest centre (squared euclidean) for every row, and in the same pass over x the per-cluster sums and
    counts: labels (N,), squared distances (N,), sums (k, D), counts (k,). The sums are a one-hot GEMM per row
    block, not index_add_ (on a GPU, a million atomic adds into k rows serialise)."""
    k = len(c)
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    d2 = torch.empty(len(x), dtype=x.dtype, device=x.device)
    sums = torch.zeros_like(c)
    counts = torch.zeros(k, dtype=torch.float64, device=x.device)  # exact beyond 2**24 rows
    for i in range(0, len(x), rows):
        xb = x[i:i + rows]
        m, a = _sqdist_to(xb, xn[i:i + rows], c, rows).min(1)  # (B,)
        labels[i:i + rows], d2[i:i + rows] = a, m
        onehot = torch.nn.functional.one_hot(a, k).to(x.dtype)  # (B, k)
        sums += onehot.T @ xb
        counts += onehot.sum(0, dtype=torch.float64)
    return labels, d2, sums, counts


def _kmeanspp(x: torch.Tensor, xn: torch.Tensor, k: int, gen: torch.Generator, rows: int) -> torch.Tensor:
    """Greedy k-means++ (sklearn's _kmeans_plusplus): each new centre is the best of 2 + log(k) candidates
    drawn with probability proportional to the squared distance to the nearest centre so far."""
    n = len(x)
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centers = [x[first]]
    closest = _sqdist_to(x, xn, centers[0], rows)[:, 0]  # (N,)
    pot = closest.sum()
    for _ in range(1, k):
        if pot <= 0:  # fewer distinct points than k: any point will do
            cand = torch.randint(n, (trials,), generator=gen, device=x.device)
        else:  # inverse-CDF draws (torch.multinomial is limited to 2**24 categories on CUDA)
            cs = torch.cumsum(closest.double(), 0)
            r = torch.rand(trials, generator=gen, device=x.device, dtype=torch.float64) * cs[-1]
            cand = torch.searchsorted(cs, r).clamp_max_(n - 1)  # (T,)
        d = torch.minimum(_sqdist_to(x, xn, x[cand], rows), closest[:, None])  # (N, T)
        pots = d.sum(0)
        best = int(torch.argmin(pots))
        centers.append(x[cand[best]][None])
        closest, pot = d[:, best], pots[best]
    return torch.cat(centers)  # (k, D)


def torch_kmeans(x: torch.Tensor, k: int, n_init: int = 4, seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
                 rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """K-means of the rows of `x` (on its device): (labels (N,), centres (k, D), inertia). Stops, as sklearn's
    Lloyd, when no label changes or the centre shift is below tol x the mean feature variance. `rows`: row
    block of the distance passes (default 2**20 on a GPU: few large GEMMs; 65536 on a CPU: less memory)."""
    if not 1 <= k <= len(x):
        raise ValueError(f"torch_kmeans: k={k} needs 1 <= k <= {len(x)} points")
    rows = rows or (1 << 20 if x.is_cuda else 65536)
    gen = torch.Generator(device=x.device)
    tol_abs = float(x.var(0, unbiased=False).mean()) * tol
    xn = (x * x).sum(1)  # (N,) squared norms, once
    best = None
    for run in range(n_init):
        gen.manual_seed(seed * 1000 + run)
        c = _kmeanspp(x, xn, k, gen, rows)
        prev = None
        for _ in range(max_iter):
            labels, d2, sums, counts = _assign(x, xn, c, rows)  # sums (k, D), counts (k,)
            if prev is not None and torch.equal(labels, prev):  # strict convergence: c is already the mean
                break
            prev = labels
            empty = torch.nonzero(counts == 0).flatten()
            if len(empty):  # relocate empty clusters to the farthest points
                far = torch.topk(d2, len(empty)).indices
                sums[empty], counts[empty] = x[far], 1
            new = sums / counts[:, None].to(x.dtype)
            shift = float(((new - c) ** 2).sum())
            c = new
            if shift <= tol_abs:
                break
        labels, d2, _, _ = _assign(x, xn, c, rows)  # labels consistent with the returned centres
        inertia = float(d2.sum())
        if best is None or inertia < best[2]:
            best = (labels, c, inertia)
    return best


def torch_silhouette_cosine(x: torch.Tensor, labels: torch.Tensor, k: int, rows: int = 4096) -> float:
    """Mean cosine silhouette of unit rows `x` (all of them: pass the sample), as sklearn's silhouette_score
    (singleton clusters score 0). Distances in row blocks: memory O(rows * N)."""
    n = len(x)
    onehot = torch.zeros(n, k, dtype=x.dtype, device=x.device)
    onehot[torch.arange(n, device=x.device), labels] = 1.0
    freq = onehot.sum(0)  # (k,)
    s = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, rows):
        d = (1.0 - x[i:i + rows] @ x.T).clamp_(0.0, 2.0)  # (B, N) cosine distances
        d[torch.arange(len(d), device=x.device), torch.arange(i, i + len(d), device=x.device)] = 0.0
        per = d @ onehot  # (B, k) summed distance to each cluster
        lb = labels[i:i + rows]
        own = freq[lb]
        a = per.gather(1, lb[:, None]).squeeze(1) / (own - 1).clamp_min(1)
        mean_other = per / freq.clamp_min(1)[None, :]
        mean_other.scatter_(1, lb[:, None], float("inf"))
        mean_other[:, freq == 0] = float("inf")
        b = mean_other.min(1).values
        sb = (b - a) / torch.maximum(a, b)
        s[i:i + rows] = torch.where((own > 1) & torch.isfinite(sb), sb, torch.zeros_like(sb))
    return float(s.mean())


def _sweep_torch(x: np.ndarray, ks: list[int], seed: int, idx: np.ndarray | None, n_init: int, device) -> dict:
    dev = _device(device)
    xt = torch.from_numpy(x).to(dev)  # (N, D) unit rows
    sample = xt if idx is None else xt[torch.from_numpy(idx).to(dev)]
    out = {}
    for k in ks:
        t0 = time.perf_counter()
        labels, c, inertia = torch_kmeans(xt, k, n_init=n_init, seed=seed)
        ls = labels if idx is None else labels[torch.from_numpy(idx).to(dev)]
        if len(torch.unique(ls)) < 2:  # sklearn's silhouette_score raises here too
            raise ValueError(f"personas: k={k} put every sampled user in one cluster; no silhouette")
        sil = torch_silhouette_cosine(sample, ls, k)
        out[k] = {"labels": labels.cpu().numpy(), "centers": normalize(c.cpu().numpy()), "silhouette": float(sil),
                  "inertia": inertia, "seconds": time.perf_counter() - t0}
    return out
