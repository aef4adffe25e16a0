"""Experiment grids (Issue 3): experiment configs compose, multiruns reuse cached stages, a failing job does not
stop the sweep but fails it at the end, the persona ranker and baselines, and the grid report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sessionbert.config import validate

from .conftest import CONF, make_cfg

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def _multirun(tmp: Path, args: list[str], timeout: int = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "SESSIONBERT_CACHE": str(tmp / "cache"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "train.py", "-m", *args, f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _jobs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if d.is_dir()), key=lambda d: int(d.name.split("_")[0]))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_grid_every_experiment_config_composes(tmp_path, experiment):
    cfg = make_cfg(tmp_path, [f"experiment={experiment}"])
    validate(cfg)
    if experiment == "ablations_gpu":
        assert cfg.model.arch == "base" and cfg.trainer.accelerator == "gpu"
        assert cfg.data.overrides.n_users >= 75_000  # >= 1M sessions (bench_simulator: 75k users -> 1.02M)


@pytest.mark.parametrize("launcher", ["joblib", "joblib_gpu", "slurm_gpu"])
def test_grid_launchers_compose(launcher):
    from hydra import compose, initialize_config_dir

    from sessionbert.grid import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "_target_" in cfg.hydra.launcher
    if launcher == "joblib_gpu":
        assert cfg.hydra.launcher.n_jobs >= 1
    assert "sessionbert.grid.FailureSummary" in str(cfg.hydra.callbacks)


@pytest.mark.parametrize("knob, expect", [("seq_len=128", ("seq_len", 128)), ("vocab_size=999", ("tokenizer.vocab_size", 999)),
                                          ("k=5", ("personas.k", 5))])
def test_grid_top_level_knobs_reach_stages(tmp_path, knob, expect):
    from omegaconf import OmegaConf

    cfg = make_cfg(tmp_path, ["experiment=ablations_cpu", knob])
    assert OmegaConf.select(cfg, expect[0]) == expect[1]


def test_grid_failing_job_does_not_stop_sweep_and_fails_it(tmp_path):
    """2-job multirun, the second job invalid: the first job's metrics exist, the failure is in the failing job's
    own log, the summary names the failing override, and the exit status is non-zero."""
    r = _multirun(tmp_path, ["experiment=smoke", "stage=data", "data.size=tiny,bogus"])
    assert r.returncode != 0, r.stderr[-2000:]
    jobs = _jobs(tmp_path / "sweep")
    assert len(jobs) == 2
    assert (jobs[0] / "metrics.json").exists()
    assert json.loads((jobs[0] / "job_status.json").read_text())["status"] == "COMPLETED"
    assert not (jobs[1] / "metrics.json").exists()
    assert "ConfigError: data.size" in (jobs[1] / "train.log").read_text()
    summary = r.stderr[r.stderr.index("[sweep] 1/2 jobs succeeded"):]
    assert "FAILED job 1: experiment=smoke stage=data data.size=bogus" in summary


@pytest.fixture(scope="module")
def tokenizer_grid(tmp_path_factory):
    """vocab_size x k multirun up to the tokenizer stage: k never reaches it, vocab reuses the events."""
    tmp = tmp_path_factory.mktemp("grid")
    r = _multirun(tmp, ["experiment=smoke", "stage=tokenizer", "vocab_size=300,600", "k=3,4"])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, _jobs(tmp / "sweep")


def test_grid_multirun_reuses_cached_stages(tokenizer_grid):
    tmp, jobs = tokenizer_grid
    assert len(jobs) == 4 and [d.name.split("_")[0] for d in jobs] == ["0", "1", "2", "3"]
    m = [json.loads((d / "metrics.json").read_text()) for d in jobs]
    ov = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) for d in jobs]
    assert ov[1][-2:] == ["vocab_size=300", "k=4"] or set(ov[1]) >= {"vocab_size=300", "k=4"}
    # one data stage for all four jobs; one tokenizer per vocab size, shared by both k values
    assert len({x["stage_dirs"]["data"] for x in m}) == 1
    assert m[0]["stage_dirs"]["tokenizer"] == m[1]["stage_dirs"]["tokenizer"] != m[2]["stage_dirs"]["tokenizer"]
    logs = [(d / "train.log").read_text() for d in jobs]
    assert "stage data: running" in logs[0] and "stage tokenizer: running" in logs[0]
    assert "stage data: reusing" in logs[1] and "stage tokenizer: reusing" in logs[1]
    assert "stage data: reusing" in logs[2] and "stage tokenizer: running" in logs[2]
    assert m[2]["tokenizer"]["vocab_size_requested"] == 600


def test_grid_report_on_multirun(tokenizer_grid):
    from sessionbert.report import write_grid_report

    tmp, jobs = tokenizer_grid
    p = write_grid_report([tmp / "sweep"])
    text = p.read_text()
    assert "| experiment | paper | ours |" in text and text.count("vocab_size=") >= 4
    import pandas as pd

    df = pd.read_csv(tmp / "sweep" / "results.csv")
    assert len(df) == 4 and set(df["vocab_size"]) == {300, 600}


def _fake_run(d: Path, overrides: list[str], model: str, seq_len: int, vocab: int, ranker: str, f1: float,
              secs: float, hit: float, seed: int = 0) -> None:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    m = {"config": {"model": model, "seq_len": seq_len, "vocab_size": vocab, "k": None, "seed": seed,
                    "data": "console"},
         "pretrain": {"mlm_loss": 3.0, "vocab_size": min(vocab, 1500)},
         "finetune": {"service_f1_micro": f1, "page_f1_micro": f1 / 2, "seconds": secs},
         "personas": {"k": 3, "ari": 0.1, "silhouette": {str(k): 0.3 - 0.02 * k for k in range(3, 10)}},
         "recommend": {"hit@5": hit, "hit@5_popularity": 0.3, "hit@5_cooccurrence": 0.32,
                       "hit@5_persona_popularity": 0.35, "ranker": ranker}}
    (d / "metrics.json").write_text(json.dumps(m))


def test_grid_report_tables_and_plots(tmp_path):
    from sessionbert.report import write_grid_report

    a, b = tmp_path / "grid_a", tmp_path / "grid_b"
    i = 0
    for model in ("sessionbert", "bert_base"):
        for s in (64, 512):
            _fake_run(a / f"{i}_x", [f"model={model}", f"seq_len={s}"], model, s, 2000, "count",
                      0.6 if model == "sessionbert" else 0.58, s / 8, 0.4)
            i += 1
    for r in ("prob", "persona"):
        _fake_run(b / f"{i}_{r}", [f"recommend.ranker={r}"], "sessionbert", 64, 2000, r, 0.6, 8, 0.45)
        i += 1
    for v in (500, 1000):
        _fake_run(b / f"{i}_{v}", [f"vocab_size={v}"], "sessionbert", 64, v, "count", 0.5 + v / 1e4, 8, 0.4)
        i += 1
    (b / f"{i}_bad").mkdir()
    (b / f"{i}_bad" / "job_status.json").write_text(json.dumps(
        {"status": "FAILED", "error": "ConfigError: x", "num": i, "overrides": ["data.size=bogus"], "ended_at": 0}))
    text = write_grid_report([a, b]).read_text()
    for png in ("f1_vs_seq_len", "finetune_time_vs_seq_len", "silhouette_vs_k", "hit5_per_ranker", "f1_vs_vocab_size"):
        assert (a / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in text
    assert "sessionbert vs bert_base +3.4% relative" in text  # 0.60 / 0.58 - 1
    assert "512 / 64 = 8.0x" in text
    assert "persona 0.4500" in text and "cooccurrence 0.3200" in text
    assert "data.size=bogus" in text and "(1 failed)" in text


def test_grid_report_spread_over_seeds(tmp_path):
    """Rankers run with 3 seeds: the claim row and the spread table give mean ± sample sd over distinct seeds
    (a second job with the same seed, e.g. from another grid, is one result, not two)."""
    from sessionbert.report import write_grid_report

    i = 0
    for seed, hits in ((0, (0.40, 0.50)), (1, (0.44, 0.52)), (2, (0.42, 0.54))):
        for r, h in zip(("count", "persona"), hits):
            _fake_run(tmp_path / f"{i}_{r}", [f"recommend.ranker={r}", f"seed={seed}"], "sessionbert", 64, 2000, r,
                      0.6, 8, h, seed=seed)
            i += 1
    _fake_run(tmp_path / f"{i}_dup", ["seq_len=64"], "sessionbert", 64, 2000, "count", 0.6, 8, 0.40, seed=0)
    text = write_grid_report([tmp_path]).read_text()
    assert "count 0.4200 ± 0.0200 (n=3)" in text and "persona 0.5200 ± 0.0200 (n=3)" in text
    assert "## Spread over seeds" in text


def test_grid_report_axis_comparisons_at_one_seed(tmp_path):
    """Extra seeds run at one configuration only (the rankers grid at seq_len 64): F1 and fine-tuning time along
    seq_len compare the most common seed's runs, not a 3-seed mean at 64 with one run at 512."""
    from sessionbert.report import write_grid_report

    i = 0
    for seed, f1, secs in ((0, 0.60, 10), (1, 0.30, 40), (2, 0.30, 40)):
        for r in ("count", "prob"):
            _fake_run(tmp_path / f"{i}_{r}", [f"recommend.ranker={r}", f"seed={seed}"], "sessionbert", 64, 2000, r,
                      f1, secs, 0.4, seed=seed)
            i += 1
    for s in (64, 512):
        _fake_run(tmp_path / f"{i}_s{s}", [f"seq_len={s}"], "sessionbert", s, 2000, "count", 0.6 if s == 64 else 0.5,
                  10 if s == 64 else 30, 0.4)
        i += 1
    _fake_run(tmp_path / f"{i}_bb", ["model=bert_base"], "bert_base", 64, 2000, "count", 0.75, 100, 0.4)
    text = write_grid_report([tmp_path]).read_text()
    assert "64: 10.0 s, 512: 30.0 s; 512 / 64 = 3.0x" in text
    assert "bert_base 0.7500, sessionbert 0.6000; sessionbert vs bert_base -20.0% relative" in text


def test_grid_cooccurrence_and_persona_rankers():
    from sessionbert.recommend.cooccurrence import cooccurrence_recs
    from sessionbert.recommend.persona import persona_recs

    used = {"a": {"x", "y"}, "b": {"x", "z"}, "c": {"y", "z", "w"}, "d": {"x"}, "e": {"q", "w"}}
    co = cooccurrence_recs(used, ["a", "d"], 2)
    assert co["a"] == ["z", "w"]  # z co-occurs with x (b) and y (c); w only with y (c)
    assert co["d"] == ["y", "z"]  # tie on co-occurrence and popularity: by name
    # persona: a's cluster-mates (e) used q and w; global popularity fills the rest
    pr = persona_recs(used, {"a": 0, "e": 0, "b": 1, "c": 1, "d": 1}, ["a"], 3)
    assert pr["a"][:2] == ["q", "w"] and "x" not in pr["a"] and len(pr["a"]) == 3


def test_grid_persona_ranker_in_pipeline_and_k_reuse(tmp_path, caplog):
    """recommend.ranker=persona depends on the personas stage: a k change re-runs personas and the persona
    recommender, never fine-tuning; the count ranker's recommend stage is reused across k."""
    from sessionbert.pipeline import run_pipeline

    fast = ["experiment=smoke", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
            "finetune.eval_prefixes_per_session=1", "personas.k_range=[3,4]"]
    m1 = run_pipeline(make_cfg(tmp_path, fast + ["k=3"]))
    rc = m1["recommend"]
    for key in ("hit@5", "hit@5_popularity", "hit@5_cooccurrence", "hit@5_persona_popularity"):
        assert 0 <= rc[key] <= 1, key
    with caplog.at_level("INFO", logger="sessionbert"):
        m2 = run_pipeline(make_cfg(tmp_path, fast + ["k=4"]))
    assert m2["stage_dirs"]["recommend"] == m1["stage_dirs"]["recommend"]  # count ranker: k does not reach it
    assert m2["stage_dirs"]["personas"] != m1["stage_dirs"]["personas"]
    caplog.clear()
    with caplog.at_level("INFO", logger="sessionbert"):
        m3 = run_pipeline(make_cfg(tmp_path, fast + ["k=4", "recommend.ranker=persona"]))
    assert "stage finetune: reusing" in caplog.text and "stage personas: reusing" in caplog.text
    assert "stage recommend: running" in caplog.text
    assert m3["recommend"]["ranker"] == "persona"
    assert m3["recommend"]["hit@5"] == pytest.approx(m3["recommend"]["hit@5_persona_popularity"])


def test_grid_pin_gpu_from_job_number(tmp_path, monkeypatch):
    """joblib_gpu: job N of a multirun sees only GPU N % GPUs (mapped through an existing CUDA_VISIBLE_DEVICES)."""
    from types import SimpleNamespace

    import torch

    import sessionbert.grid as grid

    cfg = make_cfg(tmp_path, ["experiment=smoke"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setenv("SESSIONBERT_ALL_GPUS", "recorded")  # so monkeypatch restores it (unset) afterwards
    monkeypatch.delenv("SESSIONBERT_ALL_GPUS")
    for num, expect in ((0, "4"), (3, "6"), (4, "4")):
        hc = SimpleNamespace(mode=SimpleNamespace(name="MULTIRUN"), job=SimpleNamespace(num=num))
        monkeypatch.setattr(grid, "_hydra_cfg", lambda hc=hc: hc)
        grid.pin_gpu_for_job(cfg)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expect
    monkeypatch.setattr(grid, "_hydra_cfg", lambda: None)  # a single run changes nothing
    assert grid.pin_gpu_for_job(cfg) is None
