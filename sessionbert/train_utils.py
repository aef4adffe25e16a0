"""Lightning plumbing shared by the training stages: trainer, callbacks, loggers (one W&B run per job)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichModelSummary, RichProgressBar
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
    rec = metrics.get("recommend", {})
    flat = {f"summary/{s}.{k}": v for s in ("finetune", "personas", "recommend", "pretrain")
            for k, v in metrics.get(s, {}).items() if isinstance(v, (int, float))}
    lg.experiment.log({**data, **flat, **{f"summary/recommend.{k}": v for k, v in rec.items()
                                          if isinstance(v, (int, float))}})
    png = run.out / "silhouette.png"
    if png.exists():
        lg.experiment.log({"plots/silhouette": wandb.Image(str(png))})


def build_trainer(cfg: DictConfig, run, out: Path, max_epochs: int) -> L.Trainer:
    t = cfg.trainer
    cb = []
    if cfg.callbacks.checkpoint:
        cb.append(ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, save_top_k=0))
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
    )
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = t.limit_train_batches
    if t.limit_val_batches is not None:
        kwargs["limit_val_batches"] = t.limit_val_batches
    if "strategy" in t:
        kwargs["strategy"] = t.strategy
    return L.Trainer(**kwargs)
