"""Lightning plumbing shared by the training stages: trainer, callbacks, loggers (one W&B run per job)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    RichModelSummary,
    RichProgressBar,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("sessionbert")


def job_name(cfg: DictConfig) -> str:
    """The run's name from its overrides (multirun jobs), else 'default'."""
    try:
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().job.override_dirname
    except (ValueError, ImportError):  # composed outside @hydra.main (tests, notebooks)
        name = ""
    return name or "default"


def job_group(cfg: DictConfig) -> str:
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return Path(hc.sweep.dir).as_posix().replace("/", "_")
    except (ValueError, ImportError):
        pass
    return "runs"


def make_logger(cfg: DictConfig, out: Path):
    if cfg.logger.name == "csv":
        return CSVLogger(str(out), name="csv")
    # offline unless the user asks otherwise: a job never waits on the network
    os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(project=cfg.logger.project, group=job_group(cfg), name=job_name(cfg),
                         save_dir=str(out), mode=cfg.logger.mode, reinit=True)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def close_logger(run, failed: bool) -> None:
    lg = run._logger
    if isinstance(lg, WandbLogger):
        import wandb

        # always close the run, also on failure, so the next job of a multirun starts its own
        wandb.finish(exit_code=1 if failed else 0)
    elif lg is not None:
        lg.finalize("failed" if failed else "success")


def log_summary(run, metrics: dict) -> None:
    """Tables and plots of the finished job into W&B (CSV logger: the metrics file is the record)."""
    lg = run._logger
    if not isinstance(lg, WandbLogger):
        return
    import wandb

    ft = metrics.get("finetune", {})
    rows = [[h, ft.get(f"{h}_f1_micro"), ft.get(f"{h}_f1_macro"), ft.get(f"{h}_f1_weighted"), ft.get(f"{h}_hit@5")]
            for h in ("page", "service")]
    data = {"tables/f1_per_head": wandb.Table(columns=["head", "f1_micro", "f1_macro", "f1_weighted", "hit@5"],
                                              data=rows)}
    sil = metrics.get("personas", {}).get("silhouette", {})
    if sil:
        data["tables/silhouette"] = wandb.Table(columns=["k", "silhouette"],
                                                data=[[int(k), v] for k, v in sorted(sil.items(), key=lambda x: int(x[0]))])
    flat = {f"summary/{s}.{k}": v for s in ("finetune", "personas", "recommend", "pretrain")
            for k, v in metrics.get(s, {}).items() if isinstance(v, (int, float))}
    lg.experiment.log({**data, **flat})
    png = run.out / "silhouette.png"
    if png.exists():
        lg.experiment.log({"plots/silhouette": wandb.Image(str(png))})


#: Exit status of a run stopped by SIGTERM (pre-emption) after writing a resumable checkpoint. Lightning alone
#: exits 0 there, so a pre-empted job would look finished; 75 is EX_TEMPFAIL ("try again").
EXIT_PREEMPTED = 75


class Preempted(RuntimeError):
    """Training stopped by SIGTERM; a resumable checkpoint was written."""

    exit_code = EXIT_PREEMPTED


class SigtermCheckpoint(OnExceptionCheckpoint):
    """Lightning's on-exception checkpoint, written only for SIGTERM (never for a NaN loss or a bug, so the last
    good checkpoint is never replaced by a broken state). It is the file `resume=auto` picks first."""

    def on_exception(self, trainer, *args, **kwargs) -> None:
        exc = args[-1] if args else kwargs.get("exception")
        if isinstance(exc, SIGTERMException):
            super().on_exception(trainer, *args, **kwargs)


class _SignalAt(L.Callback):
    """Sends this process a signal after optimizer step N (once): SIGTERM like a cluster pre-empting the job,
    SIGKILL like a crash or an OOM kill (before that step's checkpoint is written: checkpoint callbacks run last)."""

    def __init__(self, step: int, sig: int, group: bool = False):
        self.step, self.sig, self.sent, self.group = step, sig, False, group

    def on_train_batch_end(self, trainer, *_) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            if self.group:  # the whole process group, data-loader workers included: what SLURM and `timeout` do
                # the worst order for us: this process takes the signal only after the others had 0.5 s to react
                signal.pthread_sigmask(signal.SIG_BLOCK, {self.sig})
                os.killpg(os.getpgid(0), self.sig)
                time.sleep(0.5)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {self.sig})
            else:
                os.kill(os.getpid(), self.sig)


class ResumeState(L.Callback):
    """What makes a resumed run bit-identical to an uninterrupted one (tests/test_reliability.py).

    - **RNG**: at the start of every training step the torch (CPU and CUDA), numpy and Python RNGs are seeded from
      (seed, global step, rank), as fairseq does per update. Dropout then depends only on the step, not on what
      else drew random numbers before it (data-loader workers' base seeds, validation, a restart), so the RNG state
      at any step is checkpointed exactly by the integers (seed, global_step).
    - **Data position**: the checkpoint holds the epoch and the number of batches already trained in it; on load
      the train sampler (``SeededBatchSampler`` / ``TokenBudgetBatchSampler``, both pure functions of
      (seed, epoch)) skips those batches, so no batch is lost or replayed. MLM masks are seeded per batch
      (``MLMCollator``), so they do not depend on the worker count.
    Everything is stored as plain ints under ``checkpoint["sessionbert_resume"]`` (loads with weights_only=True).
    """

    KEY = "sessionbert_resume"

    def __init__(self, seed: int, sampler=None):
        self.seed, self.sampler = int(seed), sampler
        self.prior_seconds, self._t0 = 0.0, None  # training wall time of the interrupted runs before this one

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def train_seconds(self) -> float:
        """Wall time of `fit` over this run and every interrupted run it resumed (from the checkpoint)."""
        return self.prior_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import random

        import numpy as np
        import torch

        s = int(np.random.SeedSequence([self.seed, trainer.global_step, trainer.global_rank]).generate_state(1)[0])
        torch.manual_seed(s)  # CPU and every CUDA device
        np.random.seed(s)
        random.seed(s)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        checkpoint[self.KEY] = {
            "seed": self.seed, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
            "batches_done": int(progress.current.processed), "last_batch": bool(progress.is_last_batch),
            "train_seconds": float(self.train_seconds()),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        st = checkpoint.get(self.KEY)
        if st is None:
            log.warning("checkpoint has no data-position state (%s): the interrupted epoch restarts from its first "
                        "batch", self.KEY)
            return
        self.prior_seconds = float(st.get("train_seconds", 0.0))
        if st["seed"] != self.seed:
            raise ValueError(f"seed: the checkpoint was trained with seed={st['seed']}, this run has seed={self.seed}; "
                             "a resumed run must use the interrupted run's seed")
        if self.sampler is not None:
            # Set the epoch now: on a restart Lightning creates the train iterator *before* it calls set_epoch, and
            # with workers that iterator starts drawing batches at once (from the wrong epoch's order otherwise).
            if st.get("last_batch"):
                self.sampler.set_epoch(st["epoch"] + 1)  # the interrupted epoch was complete: a fresh one follows
            else:
                self.sampler.set_epoch(st["epoch"])
                self.sampler.resume_from(st["epoch"], st["batches_done"])
        log.info("resume: epoch %d after %d batches (global step %d)", st["epoch"], st["batches_done"],
                 st["global_step"])


def _outlive_first_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next one (the main process shutting us down) is fatal


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn` of every training / evaluation loader: a worker outlives the first SIGTERM.
    SLURM pre-emption and GNU `timeout` signal the whole process group; a worker killed by it makes the main process
    fail with "DataLoader worker ... killed by signal: Terminated" before Lightning writes its pre-emption checkpoint
    (seen on an H200, experiments/results/paper_scale_gpu_s5). The main process handles that SIGTERM and shuts its
    workers down; a later SIGTERM (multiprocessing's or torch's terminate() of a worker that did not stop) is
    fatal as usual, so nothing can hang on a worker that ignores it. Lightning's own worker seeding
    (seed_everything(workers=True)), which a custom init would replace, runs too."""
    signal.signal(signal.SIGTERM, _outlive_first_sigterm)
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)


def loader_kwargs(cfg: DictConfig) -> dict:
    """DataLoader arguments shared by the stages: runtime.num_workers workers, each started with `worker_init`; on a
    GPU, pinned batches (a copy from pageable memory waits for the device to finish its queued work first)."""
    import torch

    nw = int(cfg.runtime.num_workers)
    kw = {"num_workers": nw, "worker_init_fn": worker_init} if nw else {"num_workers": 0}
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        kw["pin_memory"] = True
    return kw


class TokenCounter(L.Callback):
    """Work done by training: real (non-pad) tokens, padded slots (B x T) and batches, summed over the steps run,
    from the ints a counting collator puts in each batch (``PadCollator(count=True)``: no device sync). Kept in
    checkpoints (Lightning saves callback state), so a resumed run reports the whole run's work; ``totals()``
    sums over DDP ranks."""

    def __init__(self):
        self.real_tokens = self.padded_slots = self.batches = self.max_batch_slots = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "padded_slots" in batch:
            self.real_tokens += int(batch["real_tokens"])
            self.padded_slots += int(batch["padded_slots"])
            self.max_batch_slots = max(self.max_batch_slots, int(batch["padded_slots"]))
            self.batches += 1

    def state_dict(self) -> dict:
        return {"real_tokens": self.real_tokens, "padded_slots": self.padded_slots, "batches": self.batches,
                "max_batch_slots": self.max_batch_slots}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))

    def totals(self, trainer: L.Trainer | None = None) -> dict:
        t = self.state_dict()
        if trainer is not None and trainer.world_size > 1:
            import torch

            v = torch.tensor([t["real_tokens"], t["padded_slots"], t["batches"]], dtype=torch.float64,
                             device=trainer.strategy.root_device)
            v = trainer.strategy.reduce(v, reduce_op="sum")
            t.update(real_tokens=int(v[0]), padded_slots=int(v[1]), batches=int(v[2]))
        return t


def resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """The checkpoint to resume from: `resume=auto` (newest of preempted.ckpt / last.ckpt in this stage's
    checkpoint folder, else a fresh start), `resume=PATH`, or none. A fresh run (resume unset) refuses to start
    over existing checkpoints instead of silently resuming or overwriting them."""
    found = [p for p in (ckpt_dir / "preempted.ckpt", ckpt_dir / "last.ckpt") if p.exists()]
    mode = cfg.get("resume")
    if mode is None:
        if found:
            raise FileExistsError(
                f"{ckpt_dir} holds checkpoints of an interrupted run ({', '.join(p.name for p in found)}): "
                "pass resume=auto to continue it, or delete the folder to start over"
            )
        return None
    if mode == "auto":
        if not found:
            log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        path = max(found, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(mode)
        if not path.is_file():
            raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
    _check_loadable(path)
    log.info("resuming from checkpoint %s", path)
    return str(path)


def _check_loadable(path: Path) -> None:
    """A truncated or corrupt checkpoint is an error naming the file, never a silent fresh start."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any load failure means the file is unusable
        raise RuntimeError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                           "delete it or pass resume=PATH to another checkpoint") from e


def fit(trainer: L.Trainer, module, train_dl, val_dl, ckpt_path: str | None) -> None:
    try:
        trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit with code 0 in Lightning: turn it into a distinct failure
        pass
    if trainer.received_sigterm:
        raise Preempted(f"SIGTERM: stopped at step {trainer.global_step}; resumable checkpoint written, "
                        "rerun the same command with resume=auto")


def build_trainer(cfg: DictConfig, run, out: Path, max_epochs: int, ckpt_dir: Path | None = None,
                  train_sampler=None, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """The stage's Trainer. `train_sampler`: the train loader's resumable batch sampler (see ResumeState).
    `callbacks`: the stage's own (e.g. TokenCounter), run before the checkpoint callbacks."""
    t = cfg.trainer
    cb: list[L.Callback] = [ResumeState(cfg.seed, train_sampler), *(callbacks or [])]
    ckpt_dir = ckpt_dir or out / "checkpoints"
    if cfg.callbacks.checkpoint:
        cb.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0,
                                  every_n_train_steps=cfg.callbacks.get("every_n_train_steps") or None))
    cb.append(SigtermCheckpoint(dirpath=str(ckpt_dir), filename="preempted"))
    # fault injection for tests and pre-emption / crash drills
    for env, sig, group in (("SESSIONBERT_SIGTERM_AT_STEP", signal.SIGTERM, False),
                            ("SESSIONBERT_SIGTERM_GROUP_AT_STEP", signal.SIGTERM, True),
                            ("SESSIONBERT_KILL_AT_STEP", signal.SIGKILL, False)):
        if os.environ.get(env):
            cb.append(_SignalAt(int(os.environ[env]), sig, group))
    if cfg.callbacks.lr_monitor and not t.fast_dev_run:
        cb.append(LearningRateMonitor(logging_interval="step"))
    if cfg.callbacks.model_summary:
        cb.append(RichModelSummary(max_depth=2))
    tty = sys.stdout.isatty()
    progress = cfg.callbacks.progress == "rich" or (cfg.callbacks.progress == "auto" and tty)
    if progress:
        cb.append(RichProgressBar())
    kwargs = dict(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision, deterministic=t.deterministic,
        gradient_clip_val=t.gradient_clip_val, log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=t.num_sanity_val_steps, fast_dev_run=t.fast_dev_run, overfit_batches=t.overfit_batches,
        max_epochs=max_epochs, callbacks=cb, logger=run.logger, enable_progress_bar=progress,
        default_root_dir=str(out), enable_model_summary=bool(cfg.callbacks.model_summary),
        # our train samplers deal batches to DDP ranks themselves (and must stay resumable): Lightning must not
        # swap in a DistributedSampler. Evaluation loaders then run whole on every rank (same metrics).
        use_distributed_sampler=False,
    )
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = t.limit_train_batches
    if t.limit_val_batches is not None:
        kwargs["limit_val_batches"] = t.limit_val_batches
    if "strategy" in t:
        kwargs["strategy"] = t.strategy
        ddp_kwargs = t.get("ddp_kwargs") or {}
        if t.strategy == "ddp" and ddp_kwargs:  # DistributedDataParallel's own options (config.validate checks names)
            from lightning.pytorch.strategies import DDPStrategy

            kwargs["strategy"] = DDPStrategy(**OmegaConf.to_container(ddp_kwargs))
    return L.Trainer(**kwargs)
