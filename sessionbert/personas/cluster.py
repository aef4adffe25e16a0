"""K-means on L2-normalised user embeddings (cosine geometry) with cosine silhouette, for each k."""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import normalize


def sweep_kmeans(emb: np.ndarray, ks: list[int], seed: int = 0, silhouette_sample: int = 10000,
                 algorithm: str = "kmeans", n_init: int = 4) -> dict[int, dict]:
    """For each k: labels, centres (unit norm) and the cosine silhouette.

    K-means on unit vectors minimises 1 - cos (spherical K-means up to the centre normalisation), which is
    the paper's "K-means with cosine similarity". The silhouette uses a fixed random sample of
    `silhouette_sample` users (exact when there are fewer), stated in the metrics.
    """
    x = normalize(np.asarray(emb, dtype=np.float32))
    if len(x) <= max(ks):
        raise ValueError(f"personas: {len(x)} users cannot be split into k={max(ks)} clusters")
    out = {}
    for k in ks:
        if algorithm == "kmeans":
            km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        elif algorithm == "minibatch":
            km = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed, batch_size=4096)
        else:
            raise ValueError(f"personas.algorithm must be kmeans or minibatch, got {algorithm!r}")
        labels = km.fit_predict(x)
        sil = silhouette_score(x, labels, metric="cosine", sample_size=min(len(x), silhouette_sample),
                               random_state=seed)
        out[k] = {"labels": labels, "centers": normalize(km.cluster_centers_), "silhouette": float(sil)}
    return out


def assign(emb: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre by cosine, and that similarity: (N,), (N,)."""
    sim = normalize(np.asarray(emb, dtype=np.float32)) @ centers.T  # (N, k)
    return sim.argmax(1), sim.max(1)
