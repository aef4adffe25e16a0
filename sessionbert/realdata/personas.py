"""Personas on real sessions without persona labels (issue 5): K-means over k of the users' SessionBERT
embeddings (``sessionbert.personas.cluster.sweep_kmeans``: unit vectors, cosine silhouette on a stated
sample), each cluster's top pages, and the same sweep on a bag-of-pages baseline. No published silhouette
exists for these data: the rows are ours only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..personas.cluster import sweep_kmeans
from .base import ResultRow


def cluster_top_pages(seqs: list[list[int]], labels: np.ndarray, names: list[str], top: int = 3) -> dict:
    """cluster -> {users, top: [(page, share of the cluster's events, lift vs all users)]}."""
    n = len(names)
    counts = np.zeros((labels.max() + 1, n))
    for s, c in zip(seqs, labels):
        counts[c] += np.bincount(np.asarray(s, dtype=np.int64), minlength=n)
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    overall = counts.sum(0) / counts.sum()
    out = {}
    for c in range(len(counts)):
        order = np.argsort(-share[c])[:top]
        out[int(c)] = {"users": int((labels == c).sum()),
                       "top": [(names[j], round(float(share[c, j]), 3), round(float(share[c, j] / overall[j]), 2))
                               for j in order]}
    return out


def evaluate_personas(name: str, seqs: list[list[int]], names: list[str], model, cfg: dict,
                      out_dir: str | None = None) -> list[ResultRow]:
    pc = cfg["personas"]
    rng = np.random.default_rng(cfg["seed"])
    pool = np.flatnonzero(np.array([len(s) >= pc["min_events"] for s in seqs]))
    users = np.sort(rng.choice(pool, size=min(pc["users"], len(pool)), replace=False))
    useqs = [seqs[i] for i in users]
    ks = list(pc["k_range"])
    emb = model.embed(useqs)  # (U, H) mean-pooled last layer of the MLM-pretrained encoder
    bag = np.stack([np.bincount(np.asarray(s, dtype=np.int64), minlength=len(names)) for s in useqs]).astype(np.float32)
    proto = (f"personas: K-means (cosine) on {len(users):,} random users with >= {pc['min_events']} events; "
             f"cosine silhouette on a sample of {min(pc['silhouette_sample'], len(users)):,}")
    rows, detail = [], {"users": int(len(users)), "ks": ks}
    for what, x in (("SessionBERT embedding", emb), ("bag of pages (floor)", bag)):
        sweep = sweep_kmeans(x, ks, seed=cfg["seed"], silhouette_sample=pc["silhouette_sample"], n_init=pc["n_init"])
        sil = {k: v["silhouette"] for k, v in sweep.items()}
        k_best = max(sil, key=sil.get)
        for k in ks:
            rows.append(ResultRow(name, f"silhouette@k={k}", proto, sil[k], None,
                                  f"{'ours' if 'Session' in what else 'floor (ours)'}: {what}"
                                  + ("; best k" if k == k_best else "")))
        detail[what] = {"silhouette": sil, "k_best": k_best,
                        "clusters": cluster_top_pages(useqs, sweep[k_best]["labels"], names)}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}_personas.json").write_text(json.dumps(detail, indent=2, default=str))
    return rows
