"""The persona-similarity ranker (the paper's open question 2): new services ranked by their use among the
users of the user's own cluster (the personas stage's K-means clusters), global popularity filling up to k."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from .baselines import group_popularity_recs


def user_clusters(personas_dir: Path) -> dict[str, int]:
    """user_id -> cluster from a personas stage folder's users.parquet."""
    df = pd.read_parquet(Path(personas_dir) / "users.parquet", columns=["user_id", "cluster"])
    return dict(zip(df["user_id"].astype(str), df["cluster"].astype(int)))


def persona_recs(used: Mapping[str, set[str]], clusters: Mapping[str, int], users: Iterable[str],
                 k: int = 5) -> dict[str, list[str]]:
    return group_popularity_recs(used, clusters, users, k)
