"""Reliability: SIGTERM writes a resumable checkpoint and exits 75; resume=auto continues it and says from
where; a fresh run refuses to start over checkpoints; a truncated checkpoint is an error naming the file;
a NaN loss stops within the step; the pipeline runs with the network cut off."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sessionbert.pipeline import run_pipeline
from sessionbert.train_utils import EXIT_PREEMPTED

from .conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "experiment=smoke", "stage=pretrain", f"hydra.run.dir={tmp}/run",
           f"paths.cache_dir={tmp}/cache", "callbacks.every_n_train_steps=2", *overrides]
    # its own session (process group), so a signal sent to the group never reaches pytest
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline", **(env or {})},
                          capture_output=True, text=True, timeout=300, start_new_session=True)


def test_sigterm_checkpoint_exit_code_then_resume(tmp_path):
    r = _train(tmp_path, env={"SESSIONBERT_SIGTERM_AT_STEP": "3"})
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
    ckpts = list((tmp_path / "cache" / "pretrain").glob(".ckpt-*/preempted.ckpt"))
    assert len(ckpts) == 1, "a resumable checkpoint is written on SIGTERM"
    assert not list((tmp_path / "cache" / "pretrain").glob("*/DONE")), "a pre-empted stage is not marked done"
    # a fresh run never silently resumes or overwrites
    r2 = _train(tmp_path)
    assert r2.returncode != 0 and "resume=auto" in r2.stderr
    # resume=auto continues, says which checkpoint it picked, and finishes the stage
    r3 = _train(tmp_path, "resume=auto")
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert f"resuming from checkpoint {ckpts[0]}" in (r3.stdout + r3.stderr)
    assert list((tmp_path / "cache" / "pretrain").glob("*/DONE"))
    assert not ckpts[0].exists(), "checkpoints of a finished stage are cleaned up"


_LOADER_UNDER_GROUP_SIGTERM = """
import os, signal, sys, time
from torch.utils.data import DataLoader, Dataset
from sessionbert.train_utils import worker_init

class Slow(Dataset):
    def __len__(self):
        return 100000
    def __getitem__(self, i):
        time.sleep(0.001)
        return i

if __name__ == "__main__":
    init = worker_init if sys.argv[1] == "worker_init" else None
    it = iter(DataLoader(Slow(), batch_size=4, num_workers=2, worker_init_fn=init))
    next(it)
    signal.signal(signal.SIGTERM, lambda *a: None)  # the main process handles it (Lightning does, in training)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.killpg(os.getpgid(0), signal.SIGTERM)  # what SLURM pre-emption and GNU timeout do
    time.sleep(0.5)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        for _ in range(100):
            next(it)
        print("workers alive")
    except RuntimeError as e:
        print("workers died:", e)
"""


@pytest.mark.parametrize("init", ["worker_init", "none"])
def test_loader_workers_survive_sigterm_to_the_process_group(tmp_path, init):
    """SLURM pre-emption and GNU `timeout` signal the whole process group. Torch's workers die of SIGTERM and the
    main process then fails on "DataLoader worker ... killed by signal" instead of writing Lightning's pre-emption
    checkpoint (a paper-scale run on an H200 lost its last 100 s of pretraining that way). Our loaders' workers
    (`train_utils.worker_init`) ignore it; without it they die (the control case)."""
    script = tmp_path / "loader.py"
    script.write_text(_LOADER_UNDER_GROUP_SIGTERM)
    r = subprocess.run([sys.executable, str(script), init], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       start_new_session=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("workers alive" if init == "worker_init" else "workers died") in r.stdout, r.stdout + r.stderr[-1000:]


def test_sigterm_to_the_process_group_with_workers_still_checkpoints(tmp_path):
    """The pipeline under a group-wide SIGTERM with 2 data-loader workers: checkpoint written, exit 75."""
    r = _train(tmp_path, "runtime.num_workers=2", env={"SESSIONBERT_SIGTERM_GROUP_AT_STEP": "3"})
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
    assert list((tmp_path / "cache" / "pretrain").glob(".ckpt-*/preempted.ckpt"))


# ---- resume after kill -9: bit-identical to an uninterrupted run ----------------------------------------------
# 2 epochs of 6 steps, a checkpoint every 2 steps. Killed after step 9 (last checkpoint: step 8, mid-epoch 2) with
# no workers, and after step 7 (last checkpoint: step 6, the end of epoch 1, before its validation) with 2 workers.
RESUME_ARGS = ("experiment=smoke", "stage=pretrain", "pretrain.epochs=2", "trainer.limit_train_batches=6",
               "callbacks.every_n_train_steps=2")


def _encoder_state(cache: Path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    done = [d for d in (cache / "pretrain").iterdir() if (d / "DONE").exists()]
    assert len(done) == 1, done
    metrics = json.loads((done[0] / "metrics.json").read_text())
    return load_file(str(done[0] / "encoder" / "model.safetensors")), metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same training, never interrupted, no data-loader workers. In a fresh process like the
    interrupted runs: in-process it would inherit this pytest process's torch thread count (which other tests may
    change), and float sums over a different number of threads differ in the last bits."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    r = _train(tmp, *RESUME_ARGS[2:], "runtime.num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "cache"


@pytest.mark.parametrize("workers,kill_at", [(0, 9), (2, 7), (2, 9)])
def test_resume_kill9_bit_identical(tmp_path, uninterrupted, workers, kill_at):
    import shutil

    import torch

    # the events and the tokenizer come from the reference's cache: only the training stage is re-run
    for stage in ("data", "tokenizer"):
        shutil.copytree(uninterrupted / stage, tmp_path / "cache" / stage)
    args = [*RESUME_ARGS[2:], f"runtime.num_workers={workers}"]
    r = _train(tmp_path, *args, env={"SESSIONBERT_KILL_AT_STEP": str(kill_at)})
    assert r.returncode == -9, f"expected SIGKILL, got {r.returncode}: {r.stderr[-2000:]}"
    assert not list((tmp_path / "cache" / "pretrain").glob("*/DONE"))
    r2 = _train(tmp_path, *args, "resume=auto")
    assert r2.returncode == 0, r2.stderr[-3000:]
    out = r2.stdout + r2.stderr
    assert "last.ckpt" in out and "resuming from checkpoint" in out
    epoch, batches = (1, 2) if kill_at == 9 else (0, 6)
    assert f"resume: epoch {epoch} after {batches} batches (global step {kill_at - 1})" in out
    ref_w, ref_m = _encoder_state(uninterrupted)
    got_w, got_m = _encoder_state(tmp_path / "cache")
    assert ref_w.keys() == got_w.keys()
    diff = [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])]
    assert not diff, f"weights differ from the uninterrupted run in {len(diff)} tensors, e.g. {diff[:3]}"
    assert got_m["mlm_loss"] == ref_m["mlm_loss"]


def test_resume_truncated_checkpoint_names_file(tmp_path, monkeypatch):
    """A checkpoint cut short (a write killed half-way) is an error naming the file, never a fresh start."""
    import sessionbert.train_utils as tu

    seen, orig = {}, tu.resolve_resume

    def truncate_then_resolve(cfg_, ckpt_dir):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "last.ckpt").write_bytes(b"PK\x03\x04truncated")
        seen["dir"] = ckpt_dir
        return orig(cfg_, ckpt_dir)

    monkeypatch.setattr(tu, "resolve_resume", truncate_then_resolve)
    with pytest.raises(RuntimeError, match=r"last\.ckpt cannot be loaded"):
        run_pipeline(make_cfg(tmp_path, ["experiment=smoke", "stage=pretrain", "resume=auto"]))
    assert (seen["dir"] / "last.ckpt").exists(), "the bad checkpoint is left for inspection, not deleted"


def test_nan_loss_stops_within_the_step(tmp_path, monkeypatch):
    import torch

    from sessionbert.models.modules import MLMModule

    orig = MLMModule.forward

    def poisoned(self, *a, **k):
        loss = orig(self, *a, **k)
        return loss * torch.tensor(float("nan")) if self.global_step >= 2 else loss

    monkeypatch.setattr(MLMModule, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="at step 2"):
        run_pipeline(make_cfg(tmp_path, ["experiment=smoke", "stage=pretrain", "callbacks.every_n_train_steps=1"]))
    last = list((tmp_path / "cache" / "pretrain").glob(".ckpt-*/last.ckpt"))
    assert last and torch.load(last[0], map_location="cpu", weights_only=False)["global_step"] == 2, \
        "the last good checkpoint (step 2) is kept, not overwritten by the broken step"


@pytest.fixture
def no_network(monkeypatch):
    """Any non-loopback connection fails; the Hugging Face hub is off."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            raise OSError(f"network disabled in tests: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_offline_whole_pipeline_with_wandb(tmp_path, no_network):
    m = run_pipeline(make_cfg(tmp_path, ["experiment=smoke", "logger=wandb"]))
    assert m["recommend"]["users"] > 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "W&B wrote an offline run"
