"""personas clustering: our torch K-means against scikit-learn, the torch and shared-matrix silhouettes against
sklearn's silhouette_score, personas.algorithm validation, and the GPU clustering benchmark on CPU (tiny)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.preprocessing import normalize

from sessionbert.config import ConfigError, validate
from sessionbert.personas.cluster import (
    silhouette_sample_indices,
    sweep_kmeans,
    torch_kmeans,
    torch_silhouette_cosine,
)
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


def _blobs(n=2000, d=24, k=5, std=0.6, seed=0):
    """Separated directions: blob centres far apart relative to the noise (cosine geometry after normalising)."""
    x, y = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=std, center_box=(-10, 10), random_state=seed)
    return x.astype(np.float32), y


def test_torch_kmeans_recovers_blobs_like_sklearn():
    x, y = _blobs()
    xn = normalize(x)
    labels, c, inertia = torch_kmeans(torch.from_numpy(xn), 5, n_init=2, seed=0)
    sk = KMeans(n_clusters=5, n_init=2, random_state=0).fit(xn)
    assert adjusted_rand_score(y, labels.numpy()) > 0.99
    assert adjusted_rand_score(sk.labels_, labels.numpy()) > 0.99
    assert inertia == pytest.approx(sk.inertia_, rel=1e-3)
    # labels are those of the nearest returned centre
    d = ((xn[:, None, :] - c.numpy()[None]) ** 2).sum(-1)
    assert (d.argmin(1) == labels.numpy()).all()


def test_torch_kmeans_handles_fewer_distinct_points_than_k():
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 30 points, 3 distinct
    labels, c, inertia = torch_kmeans(torch.from_numpy(x), 5, n_init=1, seed=0)
    assert torch.isfinite(c).all() and inertia == pytest.approx(0.0, abs=1e-6)
    assert len(np.unique(labels.numpy())) >= 3
    with pytest.raises(ValueError, match="k=40"):
        torch_kmeans(torch.from_numpy(x), 40)


def test_torch_silhouette_matches_sklearn_including_singletons():
    x, _ = _blobs(n=600, d=16, k=4, std=2.5)
    xn = normalize(x)
    labels = KMeans(n_clusters=4, n_init=1, random_state=0).fit_predict(xn)
    labels[0] = 4  # a singleton cluster scores 0 in sklearn
    ours = torch_silhouette_cosine(torch.from_numpy(xn), torch.from_numpy(labels).long(), 5, rows=128)
    assert ours == pytest.approx(silhouette_score(xn, labels, metric="cosine"), abs=1e-5)


@pytest.mark.parametrize("algorithm", ["kmeans", "minibatch", "torch"])
def test_sweep_kmeans_silhouette_is_sklearns_sampled_silhouette(algorithm):
    x, y = _blobs(n=1500)
    out = sweep_kmeans(x, [3, 5], seed=3, silhouette_sample=400, algorithm=algorithm, n_init=2, device="cpu")
    xn = normalize(x)
    for k, r in out.items():
        ref = silhouette_score(xn, r["labels"], metric="cosine", sample_size=400, random_state=3)
        assert r["silhouette"] == pytest.approx(ref, abs=1e-5), (algorithm, k)
        assert np.allclose(np.linalg.norm(r["centers"], axis=1), 1.0, atol=1e-5)
    assert adjusted_rand_score(y, out[5]["labels"]) > 0.99
    assert out[5]["silhouette"] > out[3]["silhouette"]


def test_silhouette_sample_indices_match_sklearn_and_exact_below_sample():
    assert silhouette_sample_indices(50, 100, 0) is None
    idx = silhouette_sample_indices(1000, 10, 7)
    assert len(idx) == 10 and len(set(idx)) == 10


def test_sweep_kmeans_refuses_unknown_algorithm():
    with pytest.raises(ValueError, match="personas.algorithm"):
        sweep_kmeans(np.eye(20), [3], algorithm="dbscan")


def test_config_validation_personas_algorithm(tmp_path):
    validate(make_cfg(tmp_path, ["personas.algorithm=torch"]))
    with pytest.raises(ConfigError, match="personas.algorithm"):
        validate(make_cfg(tmp_path, ["personas.algorithm=spectral"]))


def test_bench_cluster_gpu_script_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_cluster_gpu.py"), "--users", "3000",
                        "--device", "cpu", "--silhouette-sample", "500", "--n-init", "2", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["users"] == 3000
    assert sorted(res["silhouette"]) == [str(k) for k in range(3, 10)]
    # the synthetic personas are found (ARI 1.0 at 20k users; 3000 users leave them noisier)
    assert res["ari_vs_truth_k9"] > 0.6 and res["kmeans_seconds"] > 0
