"""Start-up validation of the knobs we own: fail within seconds, naming the key, before any data or model."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .data.serialize import SPECIAL_TOKENS

STAGES = ("all", "data", "tokenizer", "pretrain", "finetune", "personas", "recommend", "score_all", "report")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _int(cfg: DictConfig, key: str, lo: int | None = None, hi: int | None = None, allow_none: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: expected an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {v}")


def _prob(cfg: DictConfig, key: str) -> None:
    v = OmegaConf.select(cfg, key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < float(v) < 1.0:
        raise ConfigError(f"{key}: must be a number in (0, 1), got {v!r}")


def max_positions(cfg: DictConfig) -> int:
    if cfg.model.kind == "pretrained":
        from .models.encoder import default_general_bert_dir

        d = Path(cfg.model.pretrained_dir) if cfg.model.pretrained_dir else default_general_bert_dir()
        conf = d / "config.json"
        if not conf.exists():
            raise ConfigError(f"model.pretrained_dir: {d} has no config.json (a local Hugging Face model dir)")
        return int(json.loads(conf.read_text())["max_position_embeddings"])
    return int(cfg.model.max_position_embeddings)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key. Cheap: reads at most one small JSON file."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage: must be one of {STAGES}, got {cfg.stage!r}")
    _int(cfg, "seq_len", lo=8)
    _int(cfg, "seq_len", hi=max_positions(cfg))
    _int(cfg, "vocab_size", lo=len(SPECIAL_TOKENS) + 1)
    _int(cfg, "k", lo=2, allow_none=True)
    _int(cfg, "seed", lo=0)
    _prob(cfg, "pretrain.mlm_probability")
    for key in ("pretrain.epochs", "finetune.epochs", "pretrain.batch_size", "finetune.batch_size",
                "recommend.k", "recommend.per_session_k", "recommend.last_sessions"):
        _int(cfg, key, lo=1)
    _int(cfg, "tokenizer.max_sessions", lo=1, allow_none=True)
    for key in ("finetune.max_tokens", "finetune.pad_to_multiple_of", "finetune.max_sentences", "pretrain.max_tokens",
                "pretrain.max_sentences", "pretrain.pad_to_multiple_of"):
        _int(cfg, key, lo=1, allow_none=True)
    for key in ("pretrain.packed", "pretrain.compile", "pretrain.fused_qkv", "pretrain.fused_norm", "pretrain.fused_gelu",
                "pretrain.fused_residual", "pretrain.fused_ce", "pretrain.fused_attention"):
        v = OmegaConf.select(cfg, key, default=False)
        if not isinstance(v, bool):
            raise ConfigError(f"{key}: true or false, got {v!r}")
    if OmegaConf.select(cfg, "pretrain.packed", default=False) and cfg.model.kind == "scratch" \
            and not OmegaConf.select(cfg, "pretrain.max_tokens"):
        raise ConfigError("pretrain.packed: needs pretrain.max_tokens (tokens per packed step, e.g. 131072 on a GPU)")
    _int(cfg, "corpus.max_users", lo=1, allow_none=True)
    _int(cfg, "runtime.prep_workers", lo=0, allow_none=True)
    source = OmegaConf.select(cfg, "pretrain.source", default="corpus")
    if source not in ("corpus", "shards"):
        raise ConfigError(f"pretrain.source: corpus or shards, got {source!r}")
    if OmegaConf.select(cfg, "score_all") is not None:
        if not isinstance(OmegaConf.select(cfg.score_all, "enabled", default=False), bool):
            raise ConfigError(f"score_all.enabled: true or false, got {cfg.score_all.enabled!r}")
        v = OmegaConf.select(cfg.score_all, "packed", default=None)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"score_all.packed: true, false or null (packed on CUDA), got {v!r}")
        _int(cfg, "score_all.workers", lo=0)
        _int(cfg, "score_all.batch_rows", lo=1)
    ks = list(cfg.personas.k_range)
    if not ks or any((not isinstance(x, int)) or x < 2 for x in ks):
        raise ConfigError(f"personas.k_range: integers >= 2 expected, got {ks}")
    from .personas.cluster import ALGORITHMS

    if cfg.personas.algorithm not in ALGORITHMS:
        raise ConfigError(f"personas.algorithm: one of {ALGORITHMS}, got {cfg.personas.algorithm!r}")
    if cfg.model.kind not in ("scratch", "pretrained"):
        raise ConfigError(f"model.kind: scratch or pretrained, got {cfg.model.kind!r}")
    if cfg.model.kind == "scratch":
        from .models.encoder import ARCHS

        if cfg.model.arch not in ARCHS:
            raise ConfigError(f"model.arch: one of {sorted(ARCHS)}, got {cfg.model.arch!r}")
    if cfg.data.kind == "events":
        path = OmegaConf.select(cfg, "data.path", throw_on_missing=False)
        if path is None or OmegaConf.is_missing(cfg.data, "path"):
            raise ConfigError("data.path: required with data=events (a Parquet/CSV/JSONL file or directory)")
        if not Path(path).exists():
            raise ConfigError(f"data.path: {path} does not exist")
        if cfg.data.on_bad_rows not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_rows: error or skip, got {cfg.data.on_bad_rows!r}")
    elif cfg.data.kind == "simulator":
        from .data.simulator import SIZES

        if cfg.data.size not in SIZES:
            raise ConfigError(f"data.size: one of {sorted(SIZES)}, got {cfg.data.size!r}")
    from .recommend.recommender import RANKERS

    if cfg.recommend.ranker not in RANKERS:
        raise ConfigError(f"recommend.ranker: one of {RANKERS}, got {cfg.recommend.ranker!r}")
    if cfg.logger.name not in ("wandb", "csv"):
        raise ConfigError(f"logger.name: wandb or csv, got {cfg.logger.name!r}")
    _validate_ddp_kwargs(cfg)


def _validate_ddp_kwargs(cfg: DictConfig) -> None:
    """trainer.ddp_kwargs (trainer=ddp): options of torch's DistributedDataParallel, passed through Lightning's
    DDPStrategy. Unknown names are refused here, before any stage runs (DDP itself would only fail at the first fit)."""
    kw = OmegaConf.select(cfg, "trainer.ddp_kwargs", default=None)
    if kw is None:
        return
    if not isinstance(kw, DictConfig):
        raise ConfigError(f"trainer.ddp_kwargs: a mapping of DistributedDataParallel options, got {kw!r}")
    if kw and OmegaConf.select(cfg, "trainer.strategy", default=None) != "ddp":
        raise ConfigError("trainer.ddp_kwargs: only with trainer.strategy=ddp (trainer=ddp)")
    known = ddp_option_names()
    for key in kw:
        if key not in known:
            raise ConfigError(f"trainer.ddp_kwargs.{key}: not an option of DistributedDataParallel "
                              f"(one of {sorted(known)})")


def ddp_option_names() -> set[str]:
    """The keyword options of torch's DistributedDataParallel a user may pass (through Lightning's DDPStrategy, which
    sets the module, devices and process group itself): for `trainer.ddp_kwargs` and `bench_ddp.py --ddp-kwargs`."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return set(inspect.signature(DistributedDataParallel.__init__).parameters) - {
        "self", "module", "device_ids", "output_device", "process_group"}
