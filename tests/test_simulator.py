"""Tests of the console catalogue, the session simulator and data_stats (tiny size; one slow default test)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sessionbert.data.catalog import CatalogError, load_catalog
from sessionbert.data.schema import BILLING_SCHEMA, EVENT_SCHEMA
from sessionbert.data.simulator import SIZES, main, sim_config, simulate, simulate_to_dir
from sessionbert.data.split import time_split, used_and_adopted
from sessionbert.data.stats import data_stats

FAMILIES = {
    "compute", "storage", "databases", "analytics", "ml", "networking", "security", "monitoring", "devtools", "billing"
}
STATS_KEYS = {
    "n_users", "n_sessions", "n_events", "n_services", "n_pages", "session_length_mean", "session_length_median",
    "session_length_p99", "page_zipf_slope", "noise_event_share", "persona_accuracy_single_session",
    "persona_accuracy_full_history", "hit@5_popularity", "hit@5_persona_oracle", "users_scored", "split",
}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def tiny(catalog):
    return simulate(sim_config("tiny", seed=0), catalog)


# ----------------------------------------------------------------------------------------- catalogue


def test_catalog_sizes(catalog):
    products = catalog.product_services
    assert len(products) >= 40
    assert set(products["family"]) == FAMILIES
    assert len(catalog.pages) >= 300
    assert catalog.pages["title"].str.len().min() > 0
    assert all(len(a) > 0 for a in catalog.pages["actions"])
    assert (catalog.pages["kind"] == "help").sum() >= len(products)  # help articles
    assert {"home", "home/search"} <= set(catalog.pages["page"])  # dashboard and search
    assert len(catalog.tasks) >= 20
    assert len(catalog.personas) >= 6
    for t in catalog.tasks:  # workflows with variation
        assert len(t.steps) >= 3 and any(s.p < 1 or s.repeat > 0 or len(s.units) > 1 for s in t.steps)


def test_persona_service_weights(catalog):
    w = catalog.persona_service_weights()
    assert list(w.index) == catalog.persona_names and list(w.columns) == catalog.service_names
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert (w.to_numpy() >= 0).all()
    # personas differ: no two rows are (nearly) the same
    x = w.to_numpy()
    d = np.abs(x[:, None] - x[None]).sum(axis=2) + np.eye(len(x)) * 9
    assert d.min() > 0.2


def test_catalog_errors_name_file_and_key(tmp_path, catalog):
    text = Path(catalog.path).read_text()
    bad = tmp_path / "broken.yaml"
    bad.write_text(text.replace("- compute/instances\n", "- compute/no-such-page\n", 1))
    msg = r"broken\.yaml: tasks\[\d+\]\(launch_vm\)\.steps\[1\]: unknown page 'compute/no-such-page'"
    with pytest.raises(CatalogError, match=msg):
        load_catalog(bad)
    bad.write_text(text.replace("tasks: {deploy_web_app: 3,", "tasks: {deploy_web_ap: 3,", 1))
    msg = r"broken\.yaml: personas\[0\]\(web_developer\)\.tasks: unknown task 'deploy_web_ap'"
    with pytest.raises(CatalogError, match=msg):
        load_catalog(bad)
    bad.write_text(text.replace("\npersonas:", "\npersonaz:", 1))
    with pytest.raises(CatalogError, match=r"broken\.yaml: <top level>: missing key 'personas'"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------------- simulator


def test_sizes_and_config():
    assert {"tiny", "default", "paper"} <= set(SIZES)
    assert sim_config("tiny", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown simulator size"):
        sim_config("huge")
    with pytest.raises(ValueError, match="unknown SimConfig fields"):
        sim_config("tiny", n_userz=5)
    # paper: ~9M sessions (expected sessions per user measured at the default size: ~13.3)
    assert 8.0e6 < sim_config("paper").n_users * 13.3 < 10.0e6


def test_tiny_shape_and_schema(tiny):
    assert tiny.events.schema.equals(EVENT_SCHEMA)
    assert tiny.billing.schema.equals(BILLING_SCHEMA)
    assert 2000 <= tiny.sessions.num_rows <= 3000
    assert tiny.users.num_rows == sim_config("tiny").n_users
    ev = tiny.events.to_pandas()
    assert ev[["user_id", "session_id", "timestamp", "service", "page", "page_title", "region"]].notna().all().all()
    assert ev["action"].notna().mean() > 0.5
    assert set(tiny.sessions.column("session_id").to_pylist()) == set(ev["session_id"])
    assert tiny.sessions.column("session_id").to_pandas().is_unique


def test_tiny_ordering_and_sessions(tiny):
    ev = tiny.events.to_pandas()
    # sorted by user_id, then timestamp
    assert ev["user_id"].is_monotonic_increasing
    assert (ev.groupby("user_id", sort=False)["timestamp"].apply(lambda t: t.is_monotonic_increasing)).all()
    # each session is contiguous and sessions of a user never overlap
    assert (ev["session_id"] != ev["session_id"].shift()).sum() == ev["session_id"].nunique()
    g = ev.groupby("session_id", sort=False).agg(u=("user_id", "first"), s=("timestamp", "min"), e=("timestamp", "max"))
    same = g["u"].to_numpy()[1:] == g["u"].to_numpy()[:-1]
    assert (g["s"].to_numpy()[1:][same] > g["e"].to_numpy()[:-1][same]).all()


def test_tiny_ground_truth(tiny, catalog):
    users = tiny.users.to_pandas().set_index("user_id")
    assert set(users["primary_persona"]) == set(catalog.persona_names)  # all personas even at tiny size
    assert users["secondary_persona"].notna().any()
    has2 = users["secondary_persona"].notna()
    assert (users.loc[has2, "secondary_persona"] != users.loc[has2, "primary_persona"]).all()
    tasks_of = {p.name: set(p.tasks) for p in catalog.personas}
    sessions = tiny.sessions.to_pandas()
    assert sessions["tasks"].map(len).mean() >= 1
    for uid, tasks in zip(sessions["user_id"], sessions["tasks"]):
        sec = users.at[uid, "secondary_persona"]
        allowed = tasks_of[users.at[uid, "primary_persona"]] | (tasks_of[sec] if pd.notna(sec) else set())
        assert all(t in allowed or t.startswith("noise:") for t in tasks), (uid, tasks)
    # ground truth is beside the events, not in them
    assert not {"primary_persona", "tasks"} & set(tiny.events.column_names)


def test_tiny_adoptions_present(tiny):
    ev = tiny.events.to_pandas()
    split = time_split(ev["timestamp"], val_days=14, test_days=28)
    used, adopted = used_and_adopted(ev, split)
    assert len(adopted) >= 0.1 * len(used)  # a decent share of users first use a service in the test window
    # adopted services are persona services mostly (console noise is never new)
    assert "Console" not in {s for v in adopted.values() for s in v}


def test_billing_follows_first_use(tiny):
    ev = tiny.events.to_pandas()
    bill = tiny.billing.to_pandas()
    first = ev.groupby(["user_id", "service"])["timestamp"].min().dt.strftime("%Y-%m")
    b_first = bill.groupby(["user_id", "service"])["month"].min()
    assert (first.reindex(b_first.index) == b_first).all()  # billed from the month of first use
    assert (bill["spend_usd"] >= 0).all()


def test_determinism(catalog):
    cfg = sim_config("tiny", seed=5, n_users=60, chunk_users=25)
    a, b = simulate(cfg, catalog), simulate(cfg, catalog)
    for f in ("events", "billing", "users", "sessions"):
        assert getattr(a, f).equals(getattr(b, f)), f
    c = simulate(sim_config("tiny", seed=6, n_users=60, chunk_users=25), catalog)
    assert not a.events.equals(c.events)


def test_simulate_to_dir_matches_simulate(tmp_path, catalog):
    cfg = sim_config("tiny", seed=2, n_users=70, chunk_users=30)  # 3 chunks
    mem = simulate(cfg, catalog)
    paths = simulate_to_dir(cfg, tmp_path, catalog)
    assert {"events", "billing", "users", "sessions", "data_stats"} <= set(paths)
    for f in ("events", "billing", "users", "sessions"):
        disk = pq.read_table(paths[f])
        assert disk.schema.equals(getattr(mem, f).schema), f
        assert disk.equals(getattr(mem, f)), f
    stats = json.loads(paths["data_stats"].read_text())
    assert stats["n_sessions"] == mem.sessions.num_rows


def test_simulate_to_dir_workers_equal_serial(tmp_path, catalog):
    """Chunks simulated in 2 spawned processes: every file equal to the serial run's, data_stats.json too."""
    cfg = sim_config("tiny", seed=3, n_users=90, chunk_users=15)  # 6 chunks: more than 2 * workers in flight
    serial = simulate_to_dir(cfg, tmp_path / "serial", catalog, stats_max_users=40)
    par = simulate_to_dir(cfg, tmp_path / "par", catalog, stats_max_users=40, workers=2)
    assert set(serial) == set(par)
    for f in ("events", "billing", "users", "sessions"):
        a, b = pq.read_table(serial[f]), pq.read_table(par[f])
        assert a.num_rows > 0 and a.equals(b), f
    assert json.loads(serial["data_stats"].read_text()) == json.loads(par["data_stats"].read_text())
    assert serial["data_stats"].read_bytes() == par["data_stats"].read_bytes()


def test_data_stats_keys(tiny):
    stats = data_stats(tiny.events.to_pandas(), tiny.users.to_pandas(), seed=0)
    assert STATS_KEYS <= set(stats)
    assert stats["n_users"] == tiny.users.num_rows
    assert 0 < stats["noise_event_share"] < 1
    assert 0 <= stats["hit@5_popularity"] <= 1 and stats["users_scored"] > 0


def test_cli_prints_stats(capsys, tmp_path):
    assert main(["--size", "tiny", "--seed", "1", "--n-users", "80", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert STATS_KEYS <= set(printed)
    assert (tmp_path / "events.parquet").exists() and (tmp_path / "data_stats.json").exists()


# ------------------------------------------------------------------------- calibration (default size)


@pytest.mark.slow
def test_default_size_is_realistic_and_hard(catalog):
    """The ranges the simulator is calibrated to (see sessionbert.data.stats)."""
    data = simulate(sim_config("default", seed=0), catalog)
    s = data_stats(data.events.to_pandas(), data.users.to_pandas(), seed=0)
    assert 1500 <= s["n_users"] <= 2000 and 20_000 <= s["n_sessions"] <= 30_000
    assert 6 <= s["session_length_median"] <= 20
    assert s["session_length_p99"] >= 80
    assert s["noise_event_share"] >= 0.10
    assert s["page_zipf_slope"] < -0.5  # Zipf-like page popularity
    assert s["persona_accuracy_single_session"] <= 0.70
    assert s["persona_accuracy_full_history"] >= 0.85
    assert 0.15 <= s["hit@5_popularity"] <= 0.50
    assert s["hit@5_persona_oracle"] >= s["hit@5_popularity"] + 0.10
    assert s["users_scored"] >= 0.2 * s["n_users"]
