"""The stages of the paper in order, each a plain function whose artefacts live in a folder keyed by the
config that affects it: data -> tokenizer -> pretrain -> finetune -> personas -> recommend -> report.

A k sweep reuses the fine-tuned model; a vocab sweep reuses the events. Stage folders are written to a temp
folder beside the final one and renamed, so concurrent jobs never read a half-written artefact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from .config import validate

log = logging.getLogger("sessionbert")

#: Part of every stage's cache key: bumped whenever a code change alters what a stage writes (e.g. 2: seeded MLM
#: masks and samplers for bit-identical resume; 3: billing spend ties ordered by service name), so artefacts of an
#: older version are never reused.
CACHE_VERSION = 3


def _key(*parts) -> str:
    blob = json.dumps([CACHE_VERSION, parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(node) -> object:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class Run:
    """One job: its config, output dir, stage folders, logger and collected metrics."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.paths.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, dict] = {}
        self.stage_dirs: dict[str, Path] = {}
        self.keys: dict[str, str] = {}
        self._logger = None
        self._corpus = None
        self.corpus_note: dict | None = None  # the user sample's size when corpus.max_users samples
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
        )

    # ---- stage folders ------------------------------------------------------------------------
    def stage(self, name: str, key_parts: dict, fn: Callable[[Path], dict | None], collective: bool = False) -> Path:
        """Run `fn(tmp_dir)` unless a finished folder for this key exists; return the folder. `collective`: a training
        stage, which every DDP rank runs (see `_finish_distributed`)."""
        key = _key(name, key_parts)
        self.keys[name] = key
        root = Path(self.cfg.cache.dir) if self.cfg.cache.enabled else self.out / "stages"
        final = root / name / key
        # checkpoints live beside the stage folder (not in the temp folder) so a killed run can resume
        self.ckpt_dir = root / name / f".ckpt-{key}"
        # `stage=X` runs the stages up to X: missing upstream artefacts are computed, present ones reused
        if not collective and self.cfg.cache.enabled and _launch_rank() > 0 and not _distributed():
            _wait_for(final, name)  # torchrun / Slurm started every rank at once: rank 0 computes, the others wait
        if (final / "DONE").exists() and self.cfg.cache.enabled:
            log.info("stage %s: reusing %s", name, final)
        else:
            if final.exists():  # cache disabled: recompute over a previous run's folder
                shutil.rmtree(final)
            tmp = root / name / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            log.info("stage %s: running -> %s", name, final)
            t0 = time.perf_counter()
            try:
                metrics = fn(tmp) or {}
                if collective and _distributed():
                    # a DDP training stage ran on every rank, each into its own folder, but Lightning's checkpoints
                    # and Hugging Face's save_pretrained write on rank 0 only: rank 0's folder is published, the
                    # other ranks drop theirs and wait for it, so no rank reads a half-written or rank-local folder
                    import torch.distributed as dist

                    if dist.get_rank() == 0:
                        self._publish(tmp, final, metrics, key, key_parts, t0)
                    else:
                        shutil.rmtree(tmp, ignore_errors=True)
                    dist.barrier()
                else:
                    self._publish(tmp, final, metrics, key, key_parts, t0)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.stage_dirs[name] = final
        m = json.loads((final / "metrics.json").read_text())
        self.metrics[name] = m
        return final

    def _publish(self, tmp: Path, final: Path, metrics: dict, key: str, key_parts: dict, t0: float) -> None:
        """Finish a stage's temp folder (metrics, config, DONE) and move it into place."""
        metrics["stage_seconds"] = round(time.perf_counter() - t0, 3)
        _write_json(tmp / "metrics.json", metrics)
        _write_json(tmp / "config.json", key_parts)
        (tmp / "DONE").write_text(key)
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)  # finished: nothing left to resume
        try:
            os.rename(tmp, final)
        except OSError:  # another job finished the same key first: theirs is equivalent
            if not (final / "DONE").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- shared pieces --------------------------------------------------------------------------
    @property
    def logger(self):
        if self._logger is None:
            from .train_utils import make_logger

            self._logger = make_logger(self.cfg, self.out)
        return self._logger

    def corpus(self):
        """The in-memory Corpus of the run's events: all users, or a seeded sample of corpus.max_users users (with
        the whole data's time windows)."""
        if self._corpus is None:
            from .data.corpus import Corpus

            d = self.stage_dirs["data"]
            sample = user_sample(d / "events.parquet", OmegaConf.select(self.cfg, "corpus.max_users"), self.cfg.seed)
            period = None
            if sample is None:
                events = pd.read_parquet(d / "events.parquet")
                billing = pd.read_parquet(d / "billing.parquet") if (d / "billing.parquet").exists() else None
            else:
                import pyarrow.compute as pc
                import pyarrow.parquet as pq

                from .data.prep import _DICT_COLUMNS

                users, n_all = sample
                keep = pc.field("user_id").isin(users)
                # low-cardinality columns decoded as dictionary codes and cast back to strings after the filter, so
                # only the sample's rows are materialised (2.4x faster at 1M sessions; same table, tested)
                schema = pq.read_schema(d / "events.parquet")
                codes = [c for c in _DICT_COLUMNS if c in schema.names]
                events = pq.read_table(d / "events.parquet", filters=keep, read_dictionary=codes).cast(schema)
                events = events.to_pandas()
                billing = pq.read_table(d / "billing.parquet", filters=keep).to_pandas() \
                    if (d / "billing.parquet").exists() else None
                period = self.period()
                self.corpus_note = {"users": len(users), "of_users": n_all, "events": len(events)}
                log.info("corpus: a seeded sample of %d of %d users (corpus.max_users)", len(users), n_all)
            self._corpus = Corpus.build(events, billing, *self.split_days(),
                                        self.cfg.tokenizer.metadata, self.cfg.tokenizer.billing, period=period)
        return self._corpus

    def split_days(self) -> tuple[float, float]:
        """(val_days, test_days) of the run's time split: data.split's, or a public dataset's file-order split."""
        sp = self.cfg.data.split
        split = self.metrics.get("data", {}).get("realdata", {}).get("split", {})  # file-order split days
        return split.get("val_days", sp.val_days), split.get("test_days", sp.test_days)

    def period(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """First and last timestamp of the whole events file, from its Parquet statistics (without loading it)."""
        import pyarrow.parquet as pq

        from .data.prep import _period_end

        path = self.stage_dirs["data"] / "events.parquet"
        return _period_end(pq.ParquetFile(path), path, 1 << 20)

    def corpus_key(self) -> dict:
        """Part of the cache key of every stage that reads `corpus()` (empty for the whole corpus, so those keys
        are unchanged)."""
        m = OmegaConf.select(self.cfg, "corpus.max_users")
        return {} if m is None else {"corpus_max_users": int(m)}


def user_sample(events_path: Path, max_users: int | None, seed: int):
    """(sorted user ids as a pyarrow array, number of users in the file) of a seeded sample of `max_users` users,
    or None when the file has no more users than that (or `max_users` is None). Reads only the user_id column."""
    if max_users is None:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    users = pc.unique(pq.read_table(events_path, columns=["user_id"]).column("user_id").combine_chunks())
    if len(users) <= max_users:
        return None
    users = users.take(pc.sort_indices(users))
    pick = np.sort(np.random.default_rng(seed).choice(len(users), int(max_users), replace=False))
    return users.take(pa.array(pick)), len(users)


# ---- stages ---------------------------------------------------------------------------------------
def stage_data(run: Run) -> Path:
    cfg = run.cfg
    data_cfg = _plain(cfg.data)
    if cfg.data.kind == "events":
        paths = [Path(cfg.data.path)] + ([Path(cfg.data.billing_path)] if cfg.data.billing_path else [])
        data_cfg["_files"] = [(str(p), _fingerprint(p)) for p in paths]

    def fn(out: Path) -> dict:
        from .data.stats import data_stats

        if cfg.data.kind == "simulator":
            from .data.catalog import load_catalog
            from .data.simulator import sim_config, simulate_to_dir

            sim = sim_config(cfg.data.size, seed=cfg.data.seed, **_plain(cfg.data.overrides))
            # the simulator measures data_stats while streaming (a user sample at paper scale), on this split
            res = simulate_to_dir(sim, out, load_catalog(cfg.data.catalog), **_workers_kw(cfg))
            stats = json.loads(Path(res["data_stats"]).read_text())
            sp = cfg.data.split
            if (sp.val_days, sp.test_days) != (14, 28):  # the simulator measured on the default split
                stats = data_stats(pd.read_parquet(out / "events.parquet"), pd.read_parquet(out / "truth_users.parquet"),
                                   val_days=sp.val_days, test_days=sp.test_days, seed=cfg.seed)
        elif cfg.data.kind == "realdata":  # a public dataset (issue 5), read in place by its adapter
            stats = _realdata_events(cfg, out)
        else:
            from .data.io import read_billing, read_events, write_parquet_atomic
            from .data.schema import BILLING_SCHEMA, EVENT_SCHEMA

            events, report = read_events(cfg.data.path, on_bad_rows=cfg.data.on_bad_rows,
                                         max_bad_fraction=cfg.data.max_bad_fraction,
                                         rejects_path=run.out / "rejects.csv")
            write_parquet_atomic(events, out / "events.parquet", schema=EVENT_SCHEMA)
            if cfg.data.billing_path:
                billing, _ = read_billing(cfg.data.billing_path, on_bad_rows=cfg.data.on_bad_rows,
                                          max_bad_fraction=cfg.data.max_bad_fraction,
                                          rejects_path=run.out / "rejects_billing.csv")
                write_parquet_atomic(billing, out / "billing.parquet", schema=BILLING_SCHEMA)
            stats = {"read": report.to_dict(), "n_events": len(events), "n_users": events["user_id"].nunique(),
                     "n_sessions": events["session_id"].nunique()}
        _write_json(out / "data_stats.json", stats)
        m = {"n_events": stats.get("n_events"), "n_sessions": stats.get("n_sessions"), "n_users": stats.get("n_users")}
        if "realdata" in stats:
            m["realdata"] = stats["realdata"]
        return m

    d = run.stage("data", {"data": data_cfg}, fn)
    shutil.copyfile(d / "data_stats.json", run.out / "data_stats.json")
    return d


def _realdata_events(cfg: DictConfig, out: Path) -> dict:
    """events.parquet of a public dataset through the same atomic write as the other sources. What the data
    lack is recorded (stats["realdata"]) so later stages skip what needs it; without timestamps the file order
    is encoded as ranks (realdata.file_order_times) and the split is a file-order split by sessions."""
    from .data.io import write_parquet_atomic
    from .data.schema import EVENT_SCHEMA
    from .realdata import file_order_split_days, file_order_times, load_adapted

    ad = load_adapted(cfg.data.name, max_lines=cfg.data.get("max_lines"))
    events = ad.events
    sp = cfg.data.split
    info = {"dataset": ad.name, "has_users": ad.has_users, "has_time": ad.has_time, "has_services": ad.has_services,
            "missing": ad.missing(), "counts": ad.counts, "notes": ad.notes}
    if not ad.has_time:
        events = file_order_times(events)
        n = events["session_id"].nunique()
        val_days, test_days = file_order_split_days(n, sp.val_frac, sp.test_frac)
        info["timestamps"] = "none in the data: file-order ranks (session i at minute i), not times"
        info["split"] = {"kind": "file order", "val_frac": sp.val_frac, "test_frac": sp.test_frac,
                         "val_days": val_days, "test_days": test_days}
    else:
        info["split"] = {"kind": "time", "val_days": sp.val_days, "test_days": sp.test_days}
    if not ad.has_services:
        # the event text is "service : page"; one pseudo-service (the dataset name) stands for "none", and the
        # service head / recommendations that would need real services are skipped (run_pipeline)
        events = events.assign(service=ad.name)
    write_parquet_atomic(events, out / "events.parquet", schema=EVENT_SCHEMA)
    return {"n_events": len(events), "n_users": int(events["user_id"].nunique()),
            "n_sessions": int(events["session_id"].nunique()), "realdata": info}


def realdata_skips(run: "Run") -> dict[str, str]:
    """Stages a public dataset cannot support, with the reason (recorded in metrics.json["skipped"])."""
    info = run.metrics.get("data", {}).get("realdata")
    if not info:
        return {}
    name, skip = info["dataset"], {}
    if not info["has_users"]:
        skip["personas"] = f"{name} has no user ids (each session is its own user): no user personas"
    if not info["has_users"] or not info["has_services"]:
        what = " and ".join(w for w, ok in (("user ids", info["has_users"]), ("services", info["has_services"]))
                            if not ok)
        skip["recommend"] = f"{name} has no {what}: no new-service recommendation"
    if not info["has_services"]:
        skip["finetune.service_head"] = f"{name} has no services: the service head sees one pseudo-service"
    if not info["has_time"]:
        skip["time_split"] = f"{name} has no timestamps: file-order split ({info['split']})"
    return skip


def _fingerprint(p: Path) -> list:
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]


def stage_tokenizer(run: Run) -> Path | None:
    cfg = run.cfg
    if cfg.model.kind == "pretrained":
        return None

    def fn(out: Path) -> dict:
        from .data.tokenizer import train_wordpiece

        corpus, cap = run.corpus(), cfg.tokenizer.get("max_sessions")
        tok, note = train_wordpiece(corpus.train_texts(cap, cfg.seed), cfg.tokenizer.vocab_size,
                                    cfg.tokenizer.min_frequency)
        tok.save_pretrained(str(out / "tokenizer"))
        n_train = len(corpus.window_sessions("train"))
        return {**note, "training_sessions": n_train, "tokenizer_sessions": min(n_train, cap or n_train)}

    if _shards_mode(cfg):
        return stage_shards(run)
    return run.stage("tokenizer", {"data": run.keys["data"], "tokenizer": _plain(cfg.tokenizer), **run.corpus_key()},
                     fn)


def _shards_mode(cfg: DictConfig) -> bool:
    return cfg.model.kind == "scratch" and OmegaConf.select(cfg, "pretrain.source", default="corpus") == "shards"


def stage_shards(run: Run) -> Path:
    """pretrain.source=shards: the streaming prep (sessionbert.data.prep.prep_shards) over the whole events file
    writes the tokenizer (WordPiece on the first tokenizer.max_sessions training sessions) and the token ids of
    every session at seq_len (`shards/`), in memory bounded by one batch of events. Registered as the tokenizer
    stage: the later stages load `tokenizer/` from it as from the corpus-mode stage."""
    cfg = run.cfg

    def fn(out: Path) -> dict:
        from .data.prep import prep_shards

        d = run.stage_dirs["data"]
        val_days, test_days = run.split_days()
        bill = d / "billing.parquet"
        m = prep_shards(d / "events.parquet", out / "shards", bill if bill.exists() else None, seq_len=cfg.seq_len,
                        val_days=val_days, test_days=test_days,
                        use_region=cfg.tokenizer.metadata, use_billing=cfg.tokenizer.billing,
                        vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency,
                        tokenizer_sample=cfg.tokenizer.max_sessions or (1 << 62), **_workers_kw(cfg))
        shutil.copytree(out / "shards" / "tokenizer", out / "tokenizer")
        return {**m["tokenizer_note"], "source": "shards", "sessions": m["n_sessions"], "tokens": m["n_tokens"],
                "windows": m["windows"], "prep_seconds": m["seconds"], "training_sessions": m["windows"]["train"],
                "tokenizer_sessions": m["tokenizer_note"].get("sample_sessions")}

    key = {"data": run.keys["data"], "tokenizer": _plain(cfg.tokenizer), "source": "shards", "seq_len": cfg.seq_len}
    return run.stage("tokenizer", key, fn)


def _workers_kw(cfg: DictConfig) -> dict:
    """{"workers": runtime.prep_workers} for the simulator / streaming prep (their process pools), {} for 0."""
    w = OmegaConf.select(cfg, "runtime.prep_workers", default=0) or 0
    return {"workers": int(w)} if w else {}


def shard_ids(shard_dir: Path, window: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (T,) int32, offsets (N + 1,) int64) of the sessions of one window of a shard folder, in shard order
    (at most `limit` sessions): row i = ids[offsets[i]:offsets[i + 1]]."""
    from .data.prep import iter_shards

    ids, lens, n = [], [], 0
    for t in iter_shards(shard_dir, (window,)):
        if limit is not None and n >= limit:
            break
        col = t.column("input_ids")
        if limit is not None and n + len(col) > limit:
            col = col.slice(0, limit - n)
        col = col.combine_chunks()
        off = col.offsets.to_numpy()
        ids.append(col.values.to_numpy()[off[0]:off[-1]].astype(np.int32, copy=False))
        lens.append(np.diff(off))
        n += len(col)
    lens_all = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens_all)]).astype(np.int64)
    return (np.concatenate(ids) if ids else np.zeros(0, np.int32)), offsets


def _tokenizer(run: Run):
    from .data.tokenizer import load_tokenizer

    if run.cfg.model.kind == "pretrained":
        return load_tokenizer(_general_dir(run.cfg))
    return load_tokenizer(run.stage_dirs["tokenizer"] / "tokenizer")


def _general_dir(cfg: DictConfig) -> Path:
    from .models.encoder import default_general_bert_dir

    return Path(cfg.model.pretrained_dir) if cfg.model.pretrained_dir else default_general_bert_dir()


# pretrain.* switches that act on the packed path only (MLMModule knobs of the same names)
_PACKED_SWITCHES = ("fused_qkv", "fused_norm", "fused_gelu", "fused_residual", "fused_attention")


def stage_pretrain(run: Run) -> Path:
    cfg = run.cfg
    if cfg.model.kind == "pretrained":
        run.metrics["pretrain"] = {"skipped": f"general-text BERT from {_general_dir(cfg)}"}
        return _general_dir(cfg)

    def fn(out: Path) -> dict:
        from torch.utils.data import DataLoader

        from .data.datasets import MLMCollator, SessionDataset
        from .data.serialize import SessionEncoder
        from .models.encoder import ARCHS, bert_config
        from .models.modules import MLMModule
        from .train_utils import build_trainer, fit, loader_kwargs, resolve_resume

        tok = _tokenizer(run)
        pa = cfg.pretrain
        packed = bool(pa.get("packed", False))
        bcfg = bert_config(len(tok), tok.pad_token_id, ARCHS[cfg.model.arch], cfg.model.max_position_embeddings,
                           cfg.model.dropout)
        if packed:  # the varlen attention kernel has no attention-probability dropout (models/packed.py)
            bcfg.attention_probs_dropout_prob = 0.0
        module = MLMModule(bcfg.to_dict(), lr=cfg.pretrain.lr, weight_decay=cfg.pretrain.weight_decay,
                           warmup_ratio=cfg.pretrain.warmup_ratio, compile=bool(pa.get("compile", False)) and packed,
                           fused_ce=bool(pa.get("fused_ce", False)),
                           **{k: bool(pa.get(k, False)) and packed for k in _PACKED_SWITCHES})
        special = tok.all_special_ids
        if _shards_mode(cfg):  # every session's ids from the streaming prep (equal to the corpus path's, tested)
            from .data.datasets import IdsDataset

            sd = run.stage_dirs["tokenizer"] / "shards"
            train_ds = IdsDataset(*shard_ids(sd, "train"))
            val_ds = IdsDataset(*shard_ids(sd, "val", pa.val_max_sessions))
            train_lengths = train_ds.lengths()
        else:
            corpus = run.corpus()
            enc_obj = SessionEncoder(tok, cfg.seq_len)
            enc = corpus.encode(enc_obj)
            whole = lambda s: np.stack([s, -np.ones_like(s)], 1)  # noqa: E731
            train_ds = SessionDataset(enc_obj, enc, whole(corpus.window_sessions("train")))
            val_ds = SessionDataset(enc_obj, enc, whole(corpus.window_sessions("val")[: pa.val_max_sessions]))
            train_lengths = enc_obj.lengths(enc, train_ds.items)  # vectorised len(build(...)) of each session
        mult = None if packed else pa.get("pad_to_multiple_of")  # a packed stream has no width to round
        train_coll = MLMCollator(tok.pad_token_id, tok.mask_token_id, len(tok), special, pa.mlm_probability,
                                 pad_to_multiple_of=mult, seed=cfg.seed)
        if packed:
            from .data.datasets import PackedMLMCollator

            train_coll = PackedMLMCollator(train_coll, max_len=cfg.seq_len)
        # both samplers are pure functions of (seed, epoch) and resumable mid-epoch (train_utils.ResumeState)
        if pa.get("max_tokens"):  # length bucketing: batches of similar length, B x T <= max_tokens (GPU path)
            from .data.sampler import TokenBudgetBatchSampler

            lengths = -(-train_lengths // mult) * mult if mult else train_lengths  # the widths the collator pads to
            # max_sentences (optional): at most that many sessions per batch; with max_tokens = batch_size x seq_len
            # that is batch_size sessions grouped by length: the fixed batches' step count, without their padding
            sampler = TokenBudgetBatchSampler(lengths, int(pa.max_tokens), shuffle=True, seed=cfg.seed,
                                              max_sentences=pa.get("max_sentences"))
        else:
            from .data.sampler import SeededBatchSampler

            sampler = SeededBatchSampler(len(train_ds), pa.batch_size, shuffle=True, seed=cfg.seed)
        lk = loader_kwargs(cfg)
        train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=train_coll, **lk)
        val_dl = DataLoader(val_ds, batch_size=cfg.runtime.eval_batch_size,
                            collate_fn=MLMCollator(tok.pad_token_id, tok.mask_token_id, len(tok), special,
                                                   pa.mlm_probability, fixed_seed=cfg.seed), **lk)
        ckpt = resolve_resume(cfg, run.ckpt_dir)
        trainer = build_trainer(cfg, run, out, pa.epochs, run.ckpt_dir, train_sampler=sampler)
        t0 = time.perf_counter()
        fit(trainer, module, train_dl, val_dl, ckpt)
        seconds = time.perf_counter() - t0
        # fit validates at the end of every epoch, so its last validation saw the final weights (eval mode, fixed
        # masks): reuse that loss; a second pass only when fit ran none (e.g. resumed after its last epoch)
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("pretrain/val_mlm_loss")}
        if not val:
            val = trainer.validate(module, val_dl, verbose=False)[0]
        module.model.bert.save_pretrained(str(out / "encoder"))
        tok.save_pretrained(str(out / "encoder"))
        n_tokens = int(train_lengths.sum())
        total = _train_seconds(trainer, seconds)
        return {"mlm_loss": float(val["pretrain/val_mlm_loss_epoch"] if "pretrain/val_mlm_loss_epoch" in val
                                  else val["pretrain/val_mlm_loss"]),
                "train_sessions": int(len(train_ds)), "seconds": round(seconds, 3),
                "source": "shards" if _shards_mode(cfg) else "corpus", "train_seconds_total": round(total, 3),
                "real_tokens_per_s": round(n_tokens * pa.epochs / total, 1) if total > 0 else None,
                "train_tokens": n_tokens, "vocab_size": len(tok)}

    pre = _plain(cfg.pretrain)
    # switches of the packed path only: without it they change nothing (trainer=gpu sets them)
    if not pre.get("packed", False):
        for knob in _PACKED_SWITCHES:
            pre.pop(knob, None)
    # knobs added later, at their defaults, are left out of the key: runs from before them stay valid
    for knob, default in (("source", "corpus"), ("fused_ce", False), *((k, False) for k in _PACKED_SWITCHES)):
        if knob in pre and pre[knob] == default:
            del pre[knob]
    key = {"tokenizer": run.keys["tokenizer"], "model": _plain(cfg.model), "seq_len": cfg.seq_len, "seed": cfg.seed,
           "pretrain": pre, "precision": cfg.trainer.precision, "debug": _debug_key(cfg),
           **({} if _shards_mode(cfg) else run.corpus_key())}
    return run.stage("pretrain", key, fn, collective=True) / "encoder"


def _train_seconds(trainer, seconds: float) -> float:
    """fit's wall time summed over a run and the interrupted runs it resumed (train_utils.ResumeState)."""
    from .train_utils import ResumeState

    rs = [c for c in trainer.callbacks if isinstance(c, ResumeState)]
    return rs[0].train_seconds() if rs and rs[0].prior_seconds else seconds


def _debug_key(cfg: DictConfig) -> dict:
    t = cfg.trainer
    return {k: _plain(t[k]) for k in ("fast_dev_run", "overfit_batches", "limit_train_batches", "limit_val_batches")}


def finetune_data(run: Run, tok, labels):
    """Datasets of the fine-tuning stage (train / val / test windows), shared with the parity test."""
    from .data.datasets import SessionDataset
    from .data.serialize import SessionEncoder

    cfg, corpus = run.cfg, run.corpus()
    enc_obj = SessionEncoder(tok, cfg.seq_len)
    enc = corpus.encode(enc_obj)
    f = cfg.finetune
    sets = {}
    for i, (window, cap) in enumerate((("train", f.train_prefixes_per_session), ("val", f.eval_prefixes_per_session),
                                       ("test", f.eval_prefixes_per_session))):
        items, py, sy = corpus.prefix_examples(window, labels, cap, seed=cfg.seed + i)
        sets[window] = SessionDataset(enc_obj, enc, items, py, sy)
    return sets


def finetune_loaders(cfg: DictConfig, sets: dict, pad_id: int) -> dict:
    """DataLoaders of the fine-tuning stage over `finetune_data`'s sets: {"train", "val", "test", "sampler" (the
    train loader's resumable batch sampler), "lengths" (window -> (N,) real token counts)}.

    finetune.max_tokens null: fixed batches of finetune.batch_size (train, shuffled) and runtime.eval_batch_size
    (val/test, in order), padded to the longest in the batch. Set: length bucketing, the GPU path; training
    batches of similar-length prefixes with B x T <= max_tokens padded slots (TokenBudgetBatchSampler, shuffled,
    resumable), and val/test batches cut from the examples sorted by length under the same budget (every example
    once; the metrics accumulate over batches, so they do not depend on the order). finetune.pad_to_multiple_of
    rounds batch widths up (fewer distinct shapes on a GPU); the budget counts the rounded widths."""
    from torch.utils.data import DataLoader

    from .data.datasets import PadCollator
    from .data.sampler import SeededBatchSampler, TokenBudgetBatchSampler

    from .train_utils import loader_kwargs

    f, lk = cfg.finetune, loader_kwargs(cfg)
    mult, budget = f.get("pad_to_multiple_of"), f.get("max_tokens")
    lengths = {w: ds.encoder.lengths(ds.enc, ds.items) for w, ds in sets.items()}
    widths = {w: -(-v // mult) * mult if mult else v for w, v in lengths.items()}  # what the collator pads to
    # both train samplers are pure functions of (seed, epoch) and resumable mid-epoch (train_utils.ResumeState)
    if budget:
        # finetune.max_sentences caps the examples per batch: max_tokens >= max_sentences x seq_len gives batches of
        # max_sentences prefixes grouped by length (the fixed batches' step count without their padding)
        sampler = TokenBudgetBatchSampler(widths["train"], int(budget), shuffle=True, seed=cfg.seed,
                                          max_sentences=f.get("max_sentences"))
    else:
        sampler = SeededBatchSampler(len(sets["train"]), f.batch_size, shuffle=True, seed=cfg.seed)
    out = {"sampler": sampler, "lengths": lengths,
           "train": DataLoader(sets["train"], batch_sampler=sampler, **lk,
                               collate_fn=PadCollator(pad_id, mult, count=True))}
    coll = PadCollator(pad_id, mult)
    for w in ("val", "test"):
        if budget:  # one replica: every DDP rank evaluates all examples, as with the fixed batches
            bs = TokenBudgetBatchSampler(widths[w], int(budget), shuffle=False, num_replicas=1, rank=0)
            out[w] = DataLoader(sets[w], batch_sampler=bs, collate_fn=coll, **lk)
        else:
            out[w] = DataLoader(sets[w], batch_size=cfg.runtime.eval_batch_size, collate_fn=coll, **lk)
    return out


def stage_finetune(run: Run, encoder_dir: Path) -> Path:
    cfg = run.cfg

    def fn(out: Path) -> dict:
        from .data.corpus import LabelMaps
        from .models.encoder import load_encoder
        from .models.modules import MultiTaskModule
        from .train_utils import TokenCounter, build_trainer, fit, resolve_resume

        tok = _tokenizer(run)
        labels = LabelMaps.from_corpus(run.corpus())
        enc_model = load_encoder(encoder_dir)
        f = cfg.finetune
        module = MultiTaskModule(enc_model.config.to_dict(), len(labels.pages), len(labels.services), lr=f.lr,
                                 weight_decay=f.weight_decay, warmup_ratio=f.warmup_ratio, page_weight=f.page_weight,
                                 service_weight=f.service_weight, pooling=f.pooling, dropout=cfg.model.dropout)
        module.encoder.load_state_dict(enc_model.state_dict())
        sets = finetune_data(run, tok, labels)
        loaders = finetune_loaders(cfg, sets, tok.pad_token_id)
        counter = TokenCounter()
        ckpt = resolve_resume(cfg, run.ckpt_dir)
        trainer = build_trainer(cfg, run, out, f.epochs, run.ckpt_dir, train_sampler=loaders["sampler"],
                                callbacks=[counter])
        t0 = time.perf_counter()
        fit(trainer, module, loaders["train"], loaders["val"], ckpt)
        seconds = time.perf_counter() - t0
        test = trainer.test(module, loaders["test"], verbose=False)[0]
        trainer.save_checkpoint(str(out / "model.ckpt"), weights_only=True)
        tok.save_pretrained(str(out / "tokenizer"))
        _write_json(out / "labels.json", labels.to_dict())
        work = counter.totals(trainer)  # what training processed (all epochs, all ranks; resumed runs included)
        m = {"seconds": round(seconds, 3), "train_examples": len(sets["train"]), "test_examples": len(sets["test"]),
             "tokens_per_example_mean": float(loaders["lengths"]["train"].mean()) if len(sets["train"]) else 0.0,
             "batching": "token_budget" if f.get("max_tokens") else "fixed", "train_batches": work["batches"],
             "real_tokens": work["real_tokens"], "padded_slots": work["padded_slots"],
             "max_batch_slots": work["max_batch_slots"],
             "pad_fraction": round(1 - work["real_tokens"] / work["padded_slots"], 4) if work["padded_slots"] else None,
             "real_tokens_per_s": round(work["real_tokens"] / seconds, 1) if seconds > 0 else None}
        if run.corpus_note:
            m["corpus_sample"] = run.corpus_note
        for head in ("page", "service"):
            for name in ("f1_micro", "f1_macro", "f1_weighted", "hit@5"):
                m[f"{head}_{name}"] = float(test[f"finetune/test_{head}_{name}"])
        return m

    key = {"encoder": run.keys.get("pretrain", str(encoder_dir)), "tokenizer": run.keys.get("tokenizer"),
           "data": run.keys["data"], "model": _plain(cfg.model), "seq_len": cfg.seq_len, "seed": cfg.seed,
           "finetune": _plain(cfg.finetune), "precision": cfg.trainer.precision, "debug": _debug_key(cfg),
           **run.corpus_key()}
    return run.stage("finetune", key, fn, collective=True)


def load_finetuned(d: Path, device: torch.device | str = "cpu"):
    """(module, tokenizer, labels) of a finished fine-tuning stage folder, in eval mode."""
    from .data.corpus import LabelMaps
    from .data.tokenizer import load_tokenizer
    from .models.modules import MultiTaskModule

    module = MultiTaskModule.load_from_checkpoint(str(d / "model.ckpt"), map_location="cpu", weights_only=False)
    labels = LabelMaps(**json.loads((d / "labels.json").read_text()))
    return module.to(device).eval(), load_tokenizer(d / "tokenizer"), labels


@torch.no_grad()
def infer(module, dataset, batch_size: int, device, what: str = "predict") -> dict[str, np.ndarray]:
    """`predict_step` (probabilities) or `embed` over a dataset, in dataset order (fixed batches, as the test loop:
    tests/test_pipeline.py checks the test-loop metrics against it). Scoring users goes through sessionbert.score."""
    from torch.utils.data import DataLoader

    from .data.datasets import PadCollator

    dl = DataLoader(dataset, batch_size=batch_size, collate_fn=PadCollator(dataset.encoder.pad_id))
    outs: dict[str, list] = {}
    module.eval()
    for i, batch in enumerate(dl):
        batch = {k: v.to(device) for k, v in batch.items()}
        if what == "predict":
            r = module.predict_step(batch, i)
        else:
            r = {"embedding": module.embed(batch["input_ids"], batch["attention_mask"]).float()}
        for k, v in r.items():
            outs.setdefault(k, []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def _history_sessions(run: Run) -> np.ndarray:
    """Session indices before the test window (train + val windows)."""
    return history_sessions(run.corpus())


def stage_personas(run: Run, ft_dir: Path) -> Path:
    cfg = run.cfg

    def fn(out: Path) -> dict:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        from .personas.cluster import sweep_kmeans
        from .personas.mapping import cluster_service_profile, map_clusters

        corpus = run.corpus()
        module, tok, _ = load_finetuned(ft_dir, run.device)
        use_persona_encoder(module, cfg.personas.embedding, run.stage_dirs)
        uemb = embed_users(module, tok, corpus, cfg.seq_len, cfg.runtime.eval_batch_size, run.device)  # (U, H)
        ks = list(cfg.personas.k_range)
        if cfg.personas.k is not None and cfg.personas.k not in ks:
            ks = sorted(set(ks) | {int(cfg.personas.k)})
        sweep = sweep_kmeans(uemb.to_numpy(), ks, seed=cfg.seed, silhouette_sample=cfg.personas.silhouette_sample,
                             algorithm=cfg.personas.algorithm, n_init=cfg.personas.n_init)
        sil = {int(k): v["silhouette"] for k, v in sweep.items()}
        k_best = max((k for k in sil if k in cfg.personas.k_range), key=lambda k: sil[k])
        k = int(cfg.personas.k) if cfg.personas.k is not None else k_best
        labels = sweep[k]["labels"]
        np.save(out / "centers.npy", sweep[k]["centers"])
        np.save(out / "user_embeddings.npy", uemb.to_numpy().astype(np.float32))
        m = {"silhouette": sil, "k": k, "k_best_silhouette": k_best, "users": len(uemb),
             "silhouette_sample": min(len(uemb), cfg.personas.silhouette_sample), "pooling": "mean of last layer",
             "embedding": cfg.personas.embedding}
        assign = pd.DataFrame({"user_id": uemb.index.astype(str), "cluster": labels})
        # cluster -> persona through the services the cluster's users use (before the test window)
        catalog_path = cfg.data.get("catalog") if cfg.data.kind == "events" else "builtin"
        if catalog_path:
            from .data.catalog import load_catalog

            cat = load_catalog(None if catalog_path == "builtin" else catalog_path)
            hist = corpus.events[corpus.event_window() != "test"]
            usage = pd.crosstab(hist["user_id"], hist["service"])
            profile = cluster_service_profile(labels, list(assign["user_id"]), usage)
            # the Console pseudo-service (home, search, help) is in every persona's mix: it cannot tell them apart
            console = set(cat.services.loc[cat.services["is_console"], "name"])
            weights = cat.persona_service_weights().drop(columns=list(console), errors="ignore")
            profile = profile.drop(columns=list(console), errors="ignore")
            mapping, sim = map_clusters(profile, weights)
            assign["persona"] = assign["cluster"].map(mapping)
            m["mapping"] = {str(c): p for c, p in mapping.items()}
            sim.to_csv(out / "cluster_persona_similarity.csv")
        truth_path = run.stage_dirs["data"] / "truth_users.parquet"
        if truth_path.exists():
            truth = pd.read_parquet(truth_path).set_index("user_id")["primary_persona"]
            t = truth.reindex(assign["user_id"]).to_numpy()
            m["ari"] = float(adjusted_rand_score(t, labels))
            m["nmi"] = float(normalized_mutual_info_score(t, labels))
            if "persona" in assign:
                m["mapping_accuracy"] = float(np.mean(assign["persona"].to_numpy() == t))
        assign.to_parquet(out / "users.parquet", index=False)
        return m

    key = {"finetune": run.keys["finetune"], "personas": _plain(cfg.personas), "seed": cfg.seed}
    return run.stage("personas", key, fn)


def stage_recommend(run: Run, ft_dir: Path) -> Path:
    cfg = run.cfg

    def fn(out: Path) -> dict:
        from .data.split import used_and_adopted
        from .recommend.baselines import group_popularity_recs, popularity_recs
        from .recommend.metrics import hit_at_k

        corpus = run.corpus()
        used, adopted = used_and_adopted(corpus.events, corpus.split)
        if cfg.recommend.ranker == "persona":  # Issue 3: popularity within the user's cluster, no model scores
            recs, probs_users = _persona_ranker_recs(run, used)
        else:
            recs, probs_users = recommend_users(run, ft_dir, used)
        k = cfg.recommend.k
        top = {u: [s for s, _, _ in r] for u, r in recs.items()}
        users = list(adopted)
        from .recommend.cooccurrence import cooccurrence_recs

        m = {"hit@5": hit_at_k(top, adopted, k), "users": len(users), "users_with_history": len(probs_users),
             "hit@5_popularity": hit_at_k(popularity_recs(used, users, k), adopted, k),
             "hit@5_cooccurrence": hit_at_k(cooccurrence_recs(used, users, k), adopted, k),
             "ranker": cfg.recommend.ranker, "filter_used": cfg.recommend.filter_used,
             "protocol": f"last {cfg.recommend.last_sessions} sessions before the test window; hit when a top-{k} "
                         "service is first used by the user in the test window"}
        truth_path = run.stage_dirs["data"] / "truth_users.parquet"
        if truth_path.exists():
            truth = pd.read_parquet(truth_path).set_index("user_id")["primary_persona"].to_dict()
            m["hit@5_persona_oracle"] = hit_at_k(group_popularity_recs(used, truth, users, k), adopted, k)
        rows = [(u, r, s, c, p) for u, rr in recs.items() for r, (s, c, p) in enumerate(rr)]
        pd.DataFrame(rows, columns=["user_id", "rank", "service", "times_recommended", "summed_prob"]).to_parquet(
            out / "recommendations.parquet", index=False)
        return m

    key = {"finetune": run.keys["finetune"], "recommend": _plain(cfg.recommend), "seq_len": cfg.seq_len}
    if cfg.recommend.ranker == "persona":
        key["personas"] = run.keys["personas"]
    d = run.stage("recommend", key, fn)
    _persona_popularity_metric(run)
    return d


def data_split(run: Run):
    """The TimeSplit of the whole events file (`Run.period`), without loading it: what `Corpus.build` computes over
    all events."""
    from .data.split import time_split

    return time_split(pd.Series(list(run.period())), *run.split_days())


def _adopted_services(events_path: str, test_start: pd.Timestamp) -> tuple[dict[str, set[str]], float]:
    """(user -> services first used in the test window, seconds): score_all's adopted services, run in a worker
    process (module level, so a spawned process can import it)."""
    from .data.split import used_and_adopted_file

    t0 = time.perf_counter()
    adopted = used_and_adopted_file(events_path, test_start)[1]
    return adopted, round(time.perf_counter() - t0, 3)


def stage_score_all(run: Run, ft_dir: Path) -> Path:
    """score_all.enabled: every user of the events file scored through the API's streaming path
    (`SessionBERT.recommend_file`, what `sessionbert recommend` runs): persona by the nearest cluster centre of the
    personas stage and the top recommend.k new services from the sessions before the test window, written to
    all_users.parquet (the API's columns); Hit@5 over every user who adopts a service in the test window
    (`split.used_and_adopted_file`, the recommend stage's protocol) and, with a ground truth, persona ARI over all
    users. Memory holds a few batches of users, never the events."""
    cfg = run.cfg

    def fn(out: Path) -> dict:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        import pyarrow.parquet as pq

        from .inference import COLUMNS, OUTPUT_SCHEMA, SessionBERT
        from .recommend.metrics import hit_at_k

        module, tok, labels = load_finetuned(ft_dir, run.device)
        pdir = run.stage_dirs["personas"]
        mapping = {str(k): v for k, v in (run.metrics["personas"].get("mapping") or {}).items()}
        conf = {"seq_len": cfg.seq_len, "recommend": _plain(cfg.recommend), "tokenizer": _plain(cfg.tokenizer),
                "personas": _plain(cfg.personas)}
        d = run.stage_dirs["data"]
        bill = d / "billing.parquet"
        model = SessionBERT(module, tok, labels, np.load(pdir / "centers.npy"), mapping, conf,
                            {k: str(v) for k, v in run.stage_dirs.items()}, run.device,
                            cfg.runtime.eval_batch_size, ft_dir / "tokenizer", bill.exists(),
                            packed=OmegaConf.select(cfg, "score_all.packed", default=None))
        split = data_split(run)
        t0 = time.perf_counter()
        top: dict[str, list[str]] = {}
        clusters: list[pd.DataFrame] = []
        n_users = n_scored = 0
        # The adopted services of every user (a pyarrow pass over all events: ~30-60 s at paper scale) are
        # aggregated in a spawned process while this one scores; they meet only in the Hit@5.
        pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
        adopted_job = pool.submit(_adopted_services, str(d / "events.parquet"), split.test_start)
        with pool, pq.ParquetWriter(out / "all_users.parquet", OUTPUT_SCHEMA) as w:
            for t in model.recommend_file(d / "events.parquet", bill if bill.exists() else None,
                                          cutoff=split.test_start, workers=cfg.score_all.workers,
                                          batch_rows=cfg.score_all.batch_rows):
                w.write_table(t.select(list(COLUMNS)))
                users = t.column("user_id").to_pylist()
                top.update(zip(users, t.column("new_services").to_pylist()))
                clusters.append(pd.DataFrame({"user_id": users, "cluster": t.column("cluster").to_numpy(
                    zero_copy_only=False)}))
                n_users += t.num_rows
                n_scored += int(t.column("skipped_reason").null_count)
            score_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            adopted, adopted_s = adopted_job.result()
            wait_s = time.perf_counter() - t1
        top = {u: (r or []) for u, r in top.items()}
        k = cfg.recommend.k
        m = {"users": n_users, "users_scored": n_scored, "score_seconds": round(score_s, 3),
             "users_per_s": round(n_users / score_s, 1) if score_s > 0 else None,
             "hit@5": hit_at_k(top, adopted, k), "adopting_users": len(adopted),
             "adopted_seconds": adopted_s, "adopted_wait_seconds": round(wait_s, 3),
             "workers": cfg.score_all.workers,
             "protocol": f"every user of the data; last {cfg.recommend.last_sessions} sessions before the test "
                         f"window; hit when a top-{k} service is first used by the user in the test window"}
        truth_path = d / "truth_users.parquet"
        if truth_path.exists():
            from sklearn.metrics import adjusted_rand_score

            cl = pd.concat(clusters)
            cl = cl[cl["cluster"].notna()]
            truth = pd.read_parquet(truth_path).set_index("user_id")["primary_persona"]
            m["ari"] = float(adjusted_rand_score(truth.reindex(cl["user_id"]).to_numpy(), cl["cluster"].to_numpy()))
        return m

    key = {"finetune": run.keys["finetune"], "personas": run.keys["personas"], "recommend": _plain(cfg.recommend),
           "seq_len": cfg.seq_len}
    return run.stage("score_all", key, fn)


# ---- Issue 3 (experiment grids): the persona ranker and the persona-popularity baseline ------------------
def _persona_ranker_recs(run: Run, used: dict[str, set[str]]):
    """recommend.ranker=persona: new services by their use among the user's cluster (personas stage)."""
    from .recommend.persona import persona_recs, user_clusters

    clusters = user_clusters(run.stage_dirs["personas"])
    users = sorted(set(run.corpus().sessions["user_id"].astype(str)) & set(used))
    recs = persona_recs(used, clusters, users, run.cfg.recommend.k)
    return {u: [(s, 0, 0.0) for s in r] for u, r in recs.items()}, set(users)


def _persona_popularity_metric(run: Run) -> None:
    """recommend.hit@5_persona_popularity (the cluster-popularity baseline), from the personas stage's clusters.
    Not cached in the recommend folder, so a k grid re-runs only the personas stage."""
    if "personas" not in run.stage_dirs or "recommend" not in run.metrics:
        return
    from .data.split import used_and_adopted
    from .recommend.metrics import hit_at_k
    from .recommend.persona import persona_recs, user_clusters

    # kept beside the recommend folder's files per personas key: a later process that reuses both stages (a resumed
    # run, `stage=score_all`) reads it instead of building the Corpus again (24 s at paper scale)
    saved = run.stage_dirs["recommend"] / f"persona_popularity-{run.keys['personas']}.json"
    if saved.exists():
        hit = json.loads(saved.read_text())["hit@5_persona_popularity"]
    else:
        corpus = run.corpus()
        used, adopted = used_and_adopted(corpus.events, corpus.split)
        k = run.cfg.recommend.k
        recs = persona_recs(used, user_clusters(run.stage_dirs["personas"]), list(adopted), k)
        hit = hit_at_k(recs, adopted, k)
        _write_json(saved, {"hit@5_persona_popularity": hit})
    run.metrics["recommend"] = {**run.metrics["recommend"], "hit@5_persona_popularity": hit}


def recommend_users(run: Run, ft_dir: Path, used: dict[str, set[str]]):
    """The paper's recommender over each user's last sessions before the test window."""
    cfg = run.cfg
    module, tok, labels = load_finetuned(ft_dir, run.device)
    recs = recommend_sessions(module, tok, labels, run.corpus(), used, cfg.seq_len, cfg.recommend,
                              cfg.runtime.eval_batch_size, run.device)
    return recs, set(recs)


# ---- shared inference path ------------------------------------------------------------------------
# The pipeline's evaluation (stage_recommend, stage_personas) and the user-facing API
# (sessionbert.inference.SessionBERT, the `sessionbert` command) call the same scoring functions
# (sessionbert.score: one encoder pass per session -> recommender / next pages / mean-pooled user embedding);
# here the ids come from the run's Corpus + SessionEncoder, there from the streaming prep's serialiser (same ids).

def _utc(ts) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def history_sessions(corpus) -> np.ndarray:
    """Session indices whose session starts before the corpus' test start (the pipeline: train + val windows)."""
    return np.flatnonzero(corpus.sessions["window"].to_numpy() != "test")


def history_ids(corpus, tok, seq_len: int):
    """Token ids of every user's sessions before the corpus' test start, for `sessionbert.score`: (ids (N,) int32,
    offsets (S + 1,), session user index (S,) non-decreasing, users (U,) in corpus order, session indices (S,))."""
    from .data.serialize import SessionEncoder

    sess = history_sessions(corpus)
    enc_obj = SessionEncoder(tok, seq_len)
    enc = corpus.encode(enc_obj)
    ids, offsets = enc_obj.build_many(enc, np.stack([sess, -np.ones_like(sess)], 1))  # == build() per session
    codes, users = pd.factorize(corpus.sessions["user_id"].to_numpy()[sess])
    return ids, offsets, codes.astype(np.int64), np.asarray(users, dtype=object), sess


def recommend_sessions(module, tok, labels, corpus, used: dict[str, set[str]], seq_len: int, rec_cfg,
                       batch_size: int, device):
    """The paper's recommender over each user's last `rec_cfg.last_sessions` history sessions
    (`sessionbert.score.score_users`, the API's code path). Returns user -> [(service, times recommended,
    summed prob)] for every user with history sessions."""
    from .recommend.recommender import used_matrix
    from .score import score_users

    ids, offsets, codes, users, _ = history_ids(corpus, tok, seq_len)
    sc = score_users(module, ids, offsets, codes, len(users), used_matrix(users, labels.services, used),
                     labels.services, None, rec_cfg, device, max_tokens=batch_size * seq_len,
                     pad_id=tok.pad_token_id, embed=False)
    names = labels.services
    return {u: [(names[c], int(n), float(m)) for c, n, m in zip(sc.services[i], sc.counts[i], sc.mass[i]) if c >= 0]
            for i, u in enumerate(users)}


def use_persona_encoder(module, embedding: str, stage_dirs: dict) -> None:
    """personas.embedding=pretrained: swap the pretrained (MLM) encoder into `module` (in place)."""
    if embedding == "pretrained" and "pretrain" in stage_dirs:
        from .models.encoder import load_encoder

        module.encoder.load_state_dict(load_encoder(Path(stage_dirs["pretrain"]) / "encoder").state_dict())


def embed_users(module, tok, corpus, seq_len: int, batch_size: int, device) -> pd.DataFrame:
    """(U, H) user embeddings indexed by user_id (sorted): mean of the embeddings of the user's history sessions
    (`sessionbert.score.embed_sessions`, the API's code path)."""
    from .score import embed_sessions

    ids, offsets, codes, users, _ = history_ids(corpus, tok, seq_len)
    emb = embed_sessions(module, ids, offsets, codes, len(users), device, batch_size * seq_len, tok.pad_token_id)
    return pd.DataFrame(emb, index=pd.Index(users)).sort_index()


def write_run_config(cfg: DictConfig, out: Path) -> None:
    """The run's resolved config as `run_config.yaml` (what `SessionBERT.from_run` reads: seq_len, recommend, ...)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that only resolves inside Hydra (e.g. ${hydra:...}): keep what resolves
        plain = {}
        for k in cfg:
            try:
                plain[k] = _plain(cfg[k])
            except Exception:
                continue
    tmp = out / f".run_config.yaml.{uuid.uuid4().hex}.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
    os.replace(tmp, out / "run_config.yaml")


def run_pipeline(cfg: DictConfig) -> dict:
    """Validate the config, then run the selected stage(s). Returns the metrics dict written to metrics.json."""
    validate(cfg)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    run = Run(cfg)
    try:
        if cfg.stage == "all":
            run.logger  # one logger (one W&B run) per job, also when every stage comes from the cache
        stage_data(run)
        if cfg.stage == "data":
            return _finish(run, report=False)
        stage_tokenizer(run)
        if cfg.stage == "tokenizer":
            return _finish(run, report=False)
        enc_dir = stage_pretrain(run)
        if cfg.stage == "pretrain":
            return _finish(run, report=False)
        ft = stage_finetune(run, enc_dir)
        if _other_rank():
            return _finish(run, report=False)
        skips = realdata_skips(run)  # what a public dataset lacks: said and skipped, never faked
        if skips:
            run.metrics["skipped"] = skips
            for stage, why in skips.items():
                log.warning("skipped %s: %s", stage, why)
        if ((cfg.stage in ("all", "personas", "recommend", "score_all", "report")  # the stages up to cfg.stage
             or cfg.recommend.ranker == "persona")  # Issue 3
                and "personas" not in skips):
            stage_personas(run, ft)
        if cfg.stage in ("all", "recommend", "score_all", "report") and "recommend" not in skips:
            stage_recommend(run, ft)
        if (cfg.stage in ("all", "score_all", "report") and OmegaConf.select(cfg, "score_all.enabled", default=False)
                and "recommend" not in skips and "personas" not in skips):
            stage_score_all(run, ft)
        return _finish(run, report=cfg.stage in ("all", "report"))
    finally:
        if run._logger is not None:
            from .train_utils import close_logger

            close_logger(run, sys.exc_info()[0] is not None)


def _launch_rank() -> int:
    """This process's global rank as its launcher set it, before any process group exists: torchrun's RANK, Slurm's
    SLURM_PROCID (one task per GPU), Lightning's re-launched ranks' LOCAL_RANK; 0 without a launcher."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return 0


def _wait_for(final: Path, name: str, poll_s: float = 2.0) -> None:
    """A rank other than 0 of a launcher that starts every rank at once (torchrun, Slurm tasks): the stages before
    the first fit (data, tokenizer) are rank 0's; this rank waits for their published folder instead of repeating
    the work (at paper scale: 16 processes simulating 9M sessions, once per rank). The launcher stops every rank if
    rank 0 fails."""
    t0 = time.perf_counter()
    if not (final / "DONE").exists():
        log.info("stage %s: rank %d waits for rank 0 to publish %s", name, _launch_rank(), final)
    next_note = t0 + 600
    while not (final / "DONE").exists():
        time.sleep(poll_s)
        if time.perf_counter() >= next_note:  # a line every 10 minutes, so a long wait is visibly alive
            log.info("stage %s: still waiting for %s (%.0f s)", name, final, time.perf_counter() - t0)
            next_note += 600


def _distributed() -> bool:
    """Inside a multi-process DDP run (the process group that Lightning's `trainer=ddp` starts at the first fit)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _other_rank() -> bool:
    """A DDP rank other than 0. Lightning's launcher re-runs this script in each extra rank. Those ranks join the fits
    and tests of the training stages and stop after fine-tuning: the later stages, the metrics file and the report
    are rank 0's work."""
    import torch.distributed as dist

    return _distributed() and dist.get_rank() > 0


def _finish(run: Run, report: bool) -> dict:
    metrics = dict(run.metrics)
    if _other_rank():
        return metrics
    metrics["config"] = {"seq_len": run.cfg.seq_len, "vocab_size": run.cfg.vocab_size, "k": run.cfg.k,
                         "seed": run.cfg.seed, "model": run.cfg.model.name, "data": run.cfg.data.name}
    metrics["stage_dirs"] = {k: str(v) for k, v in run.stage_dirs.items()}
    _write_json(run.out / "metrics.json", metrics)
    write_run_config(run.cfg, run.out)
    if report:
        from .report import write_run_report

        write_run_report(run.out, metrics)
    if run._logger is not None:
        from .train_utils import log_summary

        log_summary(run, metrics)
    log.info("metrics: %s", run.out / "metrics.json")
    return metrics
