"""Map clusters to the predefined personas through the services (hence tasks) their users use."""
from __future__ import annotations

import numpy as np
import pandas as pd


def cluster_service_profile(labels: np.ndarray, user_ids: list[str], usage: pd.DataFrame) -> pd.DataFrame:
    """clusters x services: mean over the cluster's users of each user's share of events per service.

    `usage` is users x services event counts (index user_id)."""
    share = usage.div(usage.sum(1).replace(0, 1), axis=0).reindex(user_ids).fillna(0.0)
    return share.groupby(np.asarray(labels)).mean()


def map_clusters(profile: pd.DataFrame, persona_weights: pd.DataFrame) -> tuple[dict[int, str], pd.DataFrame]:
    """Each cluster -> the persona whose expected service mix (from its tasks) is most similar (cosine).

    Several clusters may map to one persona (k need not equal the number of personas).
    Returns the mapping and the clusters x personas similarity matrix.
    """
    services = sorted(set(profile.columns) | set(persona_weights.columns))
    a = profile.reindex(columns=services, fill_value=0.0).to_numpy()
    b = persona_weights.reindex(columns=services, fill_value=0.0).to_numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    sim = pd.DataFrame(a @ b.T, index=profile.index, columns=persona_weights.index)
    return {int(c): str(sim.columns[int(np.argmax(row))]) for c, row in zip(sim.index, sim.to_numpy())}, sim
