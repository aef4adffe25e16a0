"""The pipeline under Lightning's DDP (`trainer=ddp`), on 2 CPU processes (gloo): what users who outgrow one GPU run.

Lightning's launcher re-runs `train.py` in the extra rank. Every rank runs the fits and tests of the training
stages (pretraining, fine-tuning). Hugging Face's `save_pretrained` and Lightning's checkpoints write on rank 0
only, so rank 0's stage folder is the one published; the other rank waits for it, then stops after fine-tuning.
Before this was handled, rank 1 could publish its own folder, which had no encoder config.json, and the run failed
at fine-tuning. Launchers that start every rank at once (torchrun, Slurm tasks) leave the stages before the first
fit to rank 0; the other ranks wait for its folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _two_cpu_ranks_packed(tmp_path, *overrides) -> dict:
    """train.py under trainer=ddp on 2 CPU ranks (gloo), packed pretraining with every fused switch; its metrics."""
    cmd = [sys.executable, "train.py", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
           "pretrain.packed=true", "pretrain.max_tokens=4096", "finetune.max_tokens=4096",
           # the fused paths' parameters (dense biases added outside their GEMMs) reach DDP's gradient all-reduce
           "pretrain.fused_qkv=true", "pretrain.fused_norm=true", "pretrain.fused_gelu=true",
           "pretrain.fused_residual=true", "pretrain.fused_ce=true", "pretrain.fused_attention=true",
           *overrides, f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                       timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_pipeline_under_ddp_two_cpu_ranks_packed(tmp_path):
    m = _two_cpu_ranks_packed(tmp_path)
    assert (Path(m["stage_dirs"]["pretrain"]) / "encoder" / "config.json").exists()
    assert (Path(m["stage_dirs"]["finetune"]) / "model.ckpt").exists()
    assert m["finetune"]["train_batches"] == 8  # 4 per rank, summed over both
    assert 0.0 <= m["recommend"]["hit@5"] <= 1.0 and "k" in m["personas"]
    assert (tmp_path / "run" / "report.md").exists()
    # every stage ran once per run: one published folder each, no rank's leftover temp folder
    for stage in ("pretrain", "finetune", "personas", "recommend"):
        names = [p.name for p in (tmp_path / "cache" / stage).iterdir()]
        assert len([n for n in names if not n.startswith(".")]) == 1 and not [n for n in names if ".tmp" in n], names
    rank0 = (tmp_path / "run" / "train.log").read_text()
    rank1 = (tmp_path / "run" / "train_ddp_process_1.log").read_text()
    assert rank0.count("stage finetune: running") == 1 and rank1.count("stage finetune: running") == 1
    assert "stage personas: running" in rank0 and "stage personas" not in rank1  # rank 1 stops after fine-tuning


def test_paper_scale_mode_under_ddp_two_cpu_ranks(tmp_path):
    """experiment=paper_scale's data path on several GPUs (trainer=ddp): pretraining from the streaming prep's shards
    split over the ranks, the in-memory stages on the user sample, and every user scored on rank 0 after the fits."""
    from .test_scale import SCALE

    m = _two_cpu_ranks_packed(tmp_path, *SCALE[1:])
    assert m["pretrain"]["source"] == "shards" and m["finetune"]["train_batches"] == 8
    assert m["finetune"]["corpus_sample"]["users"] == 120 < m["finetune"]["corpus_sample"]["of_users"]
    assert m["score_all"]["users"] == m["finetune"]["corpus_sample"]["of_users"] and m["score_all"]["users_scored"] > 0
    rank1 = (tmp_path / "run" / "train_ddp_process_1.log").read_text()
    assert "stage pretrain: running" in rank1 and "stage score_all" not in rank1


def test_pipeline_under_torchrun_rank0_prepares_the_data_once(tmp_path):
    """torchrun (or Slurm tasks) starts every rank at once: rank 0 simulates the data and trains the tokenizer, the
    other rank waits for the published folders instead of repeating the work, then both train."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "train.py", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                       timeout=600, start_new_session=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert out.count("stage data: running") == 1 and out.count("stage tokenizer: running") == 1
    assert out.count("stage pretrain: running") == 2 and out.count("stage personas: running") == 1
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["finetune"]["train_batches"] == 8 and 0.0 <= m["recommend"]["hit@5"] <= 1.0


def test_other_launch_rank_waits_for_rank0_folder_and_never_computes(tmp_path, monkeypatch):
    """A rank > 0 (torchrun's RANK) reaching a stage before any process group exists waits until rank 0's folder
    is published, then reuses it; rank 0 (and a run without a launcher) computes as usual."""
    import threading
    import time

    from sessionbert.pipeline import Run, _key

    from .conftest import make_cfg

    cfg = make_cfg(tmp_path, ["experiment=smoke"])
    monkeypatch.setenv("RANK", "1")
    run = Run(cfg)
    final = Path(cfg.paths.cache_dir) / "data" / _key("data", {"k": 1})

    def publish():  # what rank 0 leaves behind, a moment later
        time.sleep(1.0)
        tmp = final.parent / ".tmp-rank0"
        tmp.mkdir(parents=True)
        (tmp / "metrics.json").write_text('{"from": "rank 0"}')
        (tmp / "DONE").write_text("x")
        tmp.rename(final)

    def never(out):
        raise AssertionError("rank 1 computed a stage that rank 0 publishes")

    t = threading.Thread(target=publish)
    t.start()
    t0 = time.perf_counter()
    assert run.stage("data", {"k": 1}, never) == final
    t.join()
    assert time.perf_counter() - t0 >= 0.9 and run.metrics["data"] == {"from": "rank 0"}
    monkeypatch.setenv("RANK", "0")
    assert Run(cfg).stage("tokenizer", {"k": 2}, lambda out: {"ran": True}).exists()


def _bench_ddp():
    from .conftest import experiment_module

    return experiment_module("bench_ddp")


def test_bench_ddp_options_parse_and_a_bad_one_stops_before_any_run():
    import pytest

    mod = _bench_ddp()
    assert mod.ddp_kwargs("static_graph=true, bucket_cap_mb=100,gradient_as_bucket_view=False") == {
        "static_graph": True, "bucket_cap_mb": 100, "gradient_as_bucket_view": False}
    # floats as such, anything else kept as text (DDP's own check of its values comes at construction)
    assert mod.ddp_kwargs("bucket_cap_mb=2.5,dim=abc") == {"bucket_cap_mb": 2.5, "dim": "abc"}
    assert mod.ddp_kwargs("") == {}
    with pytest.raises(SystemExit, match="'static_graph' is not key=value"):
        mod.ddp_kwargs("static_graph")
    with pytest.raises(SystemExit, match="'bucket_cap' is not an option of DistributedDataParallel"):
        mod.ddp_kwargs("bucket_cap=100")


def test_bench_ddp_tiles_the_lengths_until_one_epoch_holds_the_run_on_every_rank():
    """bench_ddp's default: the fewest copies of the lengths with which one epoch of TokenBudgetBatchSampler has more
    than the run's steps on each rank, so no epoch boundary (a GPU stall that grows with the device count) is timed."""
    import numpy as np

    from sessionbert.data.sampler import TokenBudgetBatchSampler

    mod = _bench_ddp()
    lengths = np.random.default_rng(0).integers(3, 129, 3000)
    for devices, steps in ((1, 70), (2, 70), (2, 7), (4, 300)):
        t = mod.epoch_tiles(lengths, 131072 // 16, devices, steps)

        def per_rank(k):
            return len(TokenBudgetBatchSampler(np.tile(lengths, k), 131072 // 16, shuffle=True, seed=0,
                                               num_replicas=devices, rank=0))
        assert per_rank(t) >= steps + 1, (devices, steps, t)
        assert t == 1 or per_rank(t - 1) < steps + 1, (devices, steps, t)  # the fewest copies that do
    # a sweep over 1, 2 and 4 GPUs: one tiling for all of its runs, enough for each
    t = mod.sweep_tiles(lengths, 131072 // 16, [1, 2, 4], 70)
    for devices in (1, 2, 4):
        assert len(TokenBudgetBatchSampler(np.tile(lengths, t), 131072 // 16, shuffle=True, seed=0,
                                           num_replicas=devices, rank=0)) >= 71
    assert t == mod.epoch_tiles(lengths, 131072 // 16, 4, 70) > mod.epoch_tiles(lengths, 131072 // 16, 1, 70)


def test_bench_ddp_rounds_alternate_the_order_and_the_scaling_is_the_ratio_of_means():
    """--rounds N: every device count N times, the order reversed in every other round; ddp_scaling_2gpu is the mean
    two-GPU throughput over the mean one-GPU throughput; --rounds 0 is refused before any run."""
    import pytest

    mod = _bench_ddp()
    assert mod.schedule([1, 2], 1) == [(1, 1), (1, 2)]
    assert mod.schedule([1, 2], 3) == [(1, 1), (1, 2), (2, 2), (2, 1), (3, 1), (3, 2)]
    runs = [{"devices": d, "real_tokens_per_s": v} for d, v in ((1, 100.0), (2, 190.0), (2, 194.0), (1, 102.0))]
    assert mod.mean_rates(runs) == {1: 101.0, 2: 192.0}
    assert mod.scaling(runs) == pytest.approx(192.0 / 101.0)
    assert mod.scaling([r for r in runs if r["devices"] == 2]) is None
    r = subprocess.run([sys.executable, "experiments/bench_ddp.py", "--rounds", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "--rounds must be at least 1, got 0" in r.stderr


def test_bench_ddp_one_cpu_process_under_ddp(tmp_path):
    """experiments/bench_ddp.py end to end on a CPU, tiny model, packed: `--ddp-on-one` runs the one-device
    measurement under Lightning's DDPStrategy (the wrapper's cost without communication) and records it; the result
    goes through a temporary file of the benchmark's own process; `--profile-dir` writes profiler tables."""
    import numpy as np

    lengths = tmp_path / "lengths.npy"
    np.save(lengths, np.random.default_rng(0).integers(8, 64, 400))
    out = tmp_path / "ddp.json"
    r = subprocess.run([sys.executable, "experiments/bench_ddp.py", "--lengths", str(lengths), "--devices", "1",
                        "--model", "tiny", "--tokens-per-step", "2048", "--steps", "12", "--warmup", "1", "--workers",
                        "0", "--packed", "--ddp-on-one", "--ddp-kwargs", "static_graph=true", "--out", str(out),
                        "--profile-dir", str(tmp_path / "prof")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert (run["devices"], run["strategy"], run["ddp_kwargs"], run["comm_hook"]) == (1, "DDPStrategy",
                                                                                     "static_graph=true", "none")
    assert run["real_tokens"] > 0 and run["packed"]
    # 400 sessions make < 13 batches of 2048 slots: tiled, so that no epoch boundary falls inside the timed steps
    assert run["tiles"] > 1 and run["sessions"] == 400 * run["tiles"] and run["epochs_timed"] == 1
    mod = _bench_ddp()
    assert run["tiles"] == mod.sweep_tiles(mod.capped_lengths(str(lengths), 128), 2048, [1], 13)
    tables = [p.read_text() for p in (tmp_path / "prof").iterdir()]  # --profile-dir: Lightning's PyTorchProfiler
    assert tables and any("aten::mm" in t or "aten::addmm" in t for t in tables)


def test_trainer_ddp_kwargs_reach_ddp_and_unknown_names_are_refused_before_any_stage(tmp_path):
    """trainer.ddp_kwargs (trainer=ddp): DistributedDataParallel's own options through Lightning's DDPStrategy; a name
    DDP does not take, or the options without strategy=ddp, are refused by config.validate naming the key."""
    import pytest
    from lightning.pytorch.strategies import DDPStrategy

    from sessionbert.config import ConfigError, validate
    from sessionbert.train_utils import build_trainer

    from .conftest import make_cfg

    base = ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true"]
    # an option changed and one added to the default mapping (Hydra: `+` adds a key)
    cfg = make_cfg(tmp_path, base + ["trainer.ddp_kwargs.bucket_cap_mb=50", "+trainer.ddp_kwargs.static_graph=true"])
    validate(cfg)

    class Run:
        logger = False

    trainer = build_trainer(cfg, Run(), tmp_path / "out", 1)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs == {"bucket_cap_mb": 50, "static_graph": True}
    # trainer=ddp's default: one gradient bucket (notes_speed.md, session 15: 1.917x vs 1.88x on 2x H200)
    default = build_trainer(make_cfg(tmp_path, base), Run(), tmp_path / "out", 1)
    assert isinstance(default.strategy, DDPStrategy) and default.strategy._ddp_kwargs == {"bucket_cap_mb": 1000}
    plain = build_trainer(make_cfg(tmp_path, base + ["trainer.ddp_kwargs=null"]), Run(), tmp_path / "out", 1)
    assert isinstance(plain.strategy, DDPStrategy) and plain.strategy._ddp_kwargs == {}  # null: DDP's own buckets
    with pytest.raises(ConfigError, match=r"trainer.ddp_kwargs.bucket_cap: not an option of DistributedDataParallel"):
        validate(make_cfg(tmp_path, base + ["+trainer.ddp_kwargs.bucket_cap=50"]))
    with pytest.raises(ConfigError, match="trainer.ddp_kwargs: only with trainer.strategy=ddp"):
        validate(make_cfg(tmp_path, ["experiment=smoke", "+trainer.ddp_kwargs={static_graph:true}"]))
