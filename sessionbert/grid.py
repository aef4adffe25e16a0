"""Experiment grids (Hydra multiruns): keep a sweep going past a failing job, summarise failures at the end,
and give each job of a parallel (joblib) sweep its own GPU.

Hydra 1.3's sweepers stop at the first failed job: after a batch the sweeper reads every JobReturn's
`return_value`, which re-raises the job's exception, and `on_multirun_end` never runs. So `train.py` catches
the job's exception itself (`run_job_safely`), logs the traceback into the job's own log at once and returns a
`JobFailure`; `FailureSummary` (a Hydra callback, registered in conf/hydra/default.yaml) records each job's
status in its job dir and, at the end of the sweep, prints which overrides failed and exits non-zero.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sessionbert")

STATUS_FILE = "job_status.json"


@dataclass
class JobFailure:
    """The return value of a job that raised: the sweep goes on, the callback reports it."""

    error: str
    traceback: str

    def __bool__(self) -> bool:  # `if ret:` reads as "succeeded"
        return False


def _hydra_cfg():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except (ValueError, ImportError):
        return None


def _is_multirun(hc) -> bool:
    return hc is not None and hc.mode is not None and hc.mode.name == "MULTIRUN"


def run_job_safely(fn, cfg: DictConfig):
    """Run `fn(cfg)`. In a multirun an exception becomes a logged `JobFailure` so the next jobs still run; in a
    single run it propagates as usual (a non-zero exit with the traceback)."""
    hc = _hydra_cfg()
    if not _is_multirun(hc):
        from .train_utils import Preempted

        try:
            return fn(cfg)
        except Preempted as e:  # a resumable checkpoint exists: exit non-zero so schedulers requeue, not "done"
            log.error("PREEMPTED: %s", e)
            sys.exit(e.exit_code)
    try:
        return fn(cfg)
    except Exception as e:  # noqa: BLE001 - any job error is reported, the sweep continues
        tb = traceback.format_exc()
        log.error("job %s (%s) FAILED: %s: %s\n%s", hc.job.num, hc.job.override_dirname or "no overrides",
                  type(e).__name__, e, tb)
        return JobFailure(error=f"{type(e).__name__}: {e}", traceback=tb)


# ---- one GPU per job --------------------------------------------------------------------------------
def pin_gpu_for_job(cfg: DictConfig) -> int | None:
    """In a multirun on a multi-GPU host, restrict this job to GPU `hydra.job.num % n_gpus` through
    CUDA_VISIBLE_DEVICES. Must run before anything initialises CUDA (train.py calls it first).

    With the joblib launcher worker processes are reused; CUDA cannot be re-targeted in a process where it is
    already initialised, so a reused worker keeps the GPU of its first job (one worker per GPU: n_jobs = GPUs).
    Returns the physical GPU index chosen, or None when nothing was changed.
    """
    hc = _hydra_cfg()
    if not _is_multirun(hc) or not cfg.runtime.get("gpu_per_job", True):
        return None
    if OmegaConf.select(cfg, "trainer.strategy", default=None) == "ddp":
        return None  # a DDP job uses every GPU it is given
    import torch

    all_env = os.environ.get("SESSIONBERT_ALL_GPUS")
    if all_env is None:
        if torch.cuda.is_initialized():
            return None
        n = torch.cuda.device_count()  # NVML count: does not initialise CUDA
        if n <= 1:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [s for s in visible.split(",") if s] if visible else [str(i) for i in range(n)]
        all_env = ",".join(ids[:n])
        os.environ["SESSIONBERT_ALL_GPUS"] = all_env
    ids = all_env.split(",")
    idx = int(hc.job.num) % len(ids)
    if torch.cuda.is_initialized():
        log.warning("job %s: CUDA already initialised in this worker (pinned to GPU %s); keeping it",
                    hc.job.num, os.environ.get("CUDA_VISIBLE_DEVICES"))
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[idx]
    log.info("job %s: CUDA_VISIBLE_DEVICES=%s (job number %% %d GPUs)", hc.job.num, ids[idx], len(ids))
    return int(ids[idx]) if ids[idx].isdigit() else idx


def n_gpus() -> int:
    """Number of visible GPUs (>= 1): the joblib launcher's n_jobs in conf/hydra/launcher/joblib_gpu.yaml."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 1


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sessionbert_n_gpus"):
        OmegaConf.register_new_resolver("sessionbert_n_gpus", n_gpus)


# ---- the callback -----------------------------------------------------------------------------------
def _job_failed(job_return) -> tuple[bool, str]:
    from hydra.core.utils import JobStatus

    if job_return.status == JobStatus.FAILED:
        v = job_return._return_value  # the exception (reading .return_value would re-raise it)
        return True, f"{type(v).__name__}: {v}"
    v = job_return._return_value if hasattr(job_return, "_return_value") else job_return.return_value
    if isinstance(v, JobFailure):
        return True, v.error
    return False, ""


from hydra.experimental.callback import Callback  # noqa: E402


class FailureSummary(Callback):
    """Hydra callback: each job writes `job_status.json` into its own dir (so it also works when jobs run in
    other processes or on other nodes: joblib, submitit); at the end of the sweep the summary lists the failed
    jobs with their overrides and the process exits with status 1."""

    def __init__(self, exit_nonzero: bool = True) -> None:
        self.exit_nonzero = exit_nonzero
        self.t0 = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.t0 = time.time()

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        hc = config.hydra
        if getattr(hc.mode, "name", str(hc.mode)) != "MULTIRUN":
            return
        failed, error = _job_failed(job_return)
        out = Path(hc.runtime.output_dir)
        status = {"status": "FAILED" if failed else "COMPLETED", "error": error, "num": int(hc.job.num),
                  "overrides": list(job_return.overrides or []), "ended_at": time.time()}
        try:
            tmp = out / f".{STATUS_FILE}.tmp"
            tmp.write_text(json.dumps(status, indent=2))
            os.replace(tmp, out / STATUS_FILE)
        except OSError:  # pragma: no cover - the job dir vanished
            pass
        if failed:
            print(f"[sweep] job {hc.job.num} FAILED ({' '.join(status['overrides'])}): {error}", file=sys.stderr,
                  flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        statuses = collect_statuses(Path(config.hydra.sweep.dir), since=self.t0 - 1)
        failed = [s for s in statuses if s["status"] == "FAILED"]
        msg = summary_text(statuses)
        print(msg, file=sys.stderr, flush=True)
        if failed and self.exit_nonzero:
            # Jobs catch their own exceptions so the sweep runs every job; Hydra then sees only successful
            # returns and would exit 0. Exiting here makes `make ablations`, CI and schedulers notice the failure.
            raise SystemExit(1)


def collect_statuses(sweep_dir: Path, since: float = 0.0) -> list[dict]:
    out = []
    for p in sorted(sweep_dir.rglob(STATUS_FILE)):
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if s.get("ended_at", 0) >= since:
            s["dir"] = str(p.parent)
            out.append(s)
    return sorted(out, key=lambda s: s["num"])


def summary_text(statuses: list[dict]) -> str:
    failed = [s for s in statuses if s["status"] == "FAILED"]
    lines = [f"[sweep] {len(statuses) - len(failed)}/{len(statuses)} jobs succeeded, {len(failed)} failed"]
    for s in failed:
        lines.append(f"[sweep]   FAILED job {s['num']}: {' '.join(s['overrides'])} -> {s['error']}  ({s['dir']})")
    return "\n".join(lines)
