"""Use a trained SessionBERT: persona and top-5 new services for anyone's session log, and export.

    from sessionbert.inference import SessionBERT
    model = SessionBERT.from_run("outputs/2026-11-28/12-00-00")
    table = model.predict(events, billing=None, cutoff="2026-03-01")   # one row per user

`predict` runs the pipeline's evaluation path: the vectorised serialisation of the streaming prep
(`sessionbert.data.userbatch`, ids equal to the pipeline's `Corpus` + `SessionEncoder`), then `sessionbert.score`
(one encoder pass per session: the paper's recommender, next pages, user embedding), the functions the pipeline's
stage_recommend / stage_personas call, so scoring the pipeline's own users with cutoff = the split's test start
reproduces its `recommend.hit@5`. `recommend_file` streams an event file or folder in batches of whole users: a
Parquet file in splits of row groups that a pool of worker processes read, validate, serialise and tokenise while
the main process runs the model; CSV / JSONL (and folders) in blocks that the main process reads and validates
(`io.stream_events`) and the workers serialise and tokenise. Memory holds a few batches, never the input.

Unknown services, pages and actions (never seen in training) need no special handling: their text is split by
the run's WordPiece tokenizer exactly as in training, and word pieces outside its vocabulary become [UNK]; a
service never seen as a training target simply can never be recommended (the heads only know training classes).
"""
from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from omegaconf import OmegaConf

from . import pipeline as P
from .data.userbatch import Context, Prepared, prepare

#: Output columns of `SessionBERT.predict` (and the `sessionbert recommend` file), in order.
COLUMNS = ("user_id", "n_sessions", "persona", "cluster", "persona_similarity", "new_services",
           "new_service_scores", "new_service_counts", "next_pages", "next_page_probs", "skipped_reason")

SKIP_NO_HISTORY = "no sessions before the cut-off"


class MissingRunFileError(FileNotFoundError):
    """A run directory lacks a file `SessionBERT.from_run` needs; the message names it."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingRunFileError(f"{path}: missing ({what})")
    return path


def _stage_dir(run_dir: Path, stage_dirs: dict, name: str) -> Path:
    if name not in stage_dirs:
        raise MissingRunFileError(f"{run_dir / 'metrics.json'}: no stage_dirs.{name} (the run did not reach the "
                                  f"{name} stage)")
    d = Path(stage_dirs[name])
    if not d.is_absolute() and not d.exists() and (run_dir / d).exists():
        d = run_dir / d
    return _need(d, f"the {name} stage folder named in {run_dir / 'metrics.json'}")


class SessionBERT:
    """A finished pipeline run, ready to score session logs (see the module docstring)."""

    def __init__(self, module, tokenizer, labels, centers: np.ndarray | None, mapping: dict[str, str],
                 config: dict, stage_dirs: dict, device: torch.device, batch_size: int = 256,
                 tokenizer_dir: str | Path | None = None, trained_with_billing: bool = True, packed: bool | None = None):
        self.module, self.tok, self.labels = module, tokenizer, labels
        self.packed = packed  # the padding-free encoder pass (sessionbert.score._encode); same outputs; None: on CUDA
        self.centers, self.mapping = centers, mapping
        self.config, self.stage_dirs = config, stage_dirs
        self.device, self.batch_size = device, batch_size
        self.seq_len = int(config["seq_len"])
        self.rec_cfg = dict(config["recommend"])
        tcfg = config.get("tokenizer", {}) or {}
        self.use_region = bool(tcfg.get("metadata", True))
        self.use_billing = bool(tcfg.get("billing", True)) and trained_with_billing
        self.tokenizer_dir = str(tokenizer_dir) if tokenizer_dir else None
        # padded slots per encoder batch (sessions are batched in length order: little padding). On a GPU at least
        # 2^18: with eval_batch_size x seq_len (16k slots for the tiny run) the H200 waited on per-batch launch
        # overhead (1M users in 111 s, experiments/results/bench_inference_gpu.txt)
        self.max_tokens = batch_size * self.seq_len
        if device.type == "cuda":
            self.max_tokens = max(self.max_tokens, 1 << 18)
        emb = (config.get("personas", {}) or {}).get("embedding", "finetuned")
        self.persona_module = None  # None: the fine-tuned encoder's pass also gives the embeddings
        if emb == "pretrained" and "pretrain" in stage_dirs:
            self.persona_module = copy.deepcopy(module)
            P.use_persona_encoder(self.persona_module, emb, stage_dirs)

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device | None = None,
                 batch_size: int | None = None) -> "SessionBERT":
        """Load a run dir written by `python train.py` (metrics.json, run_config.yaml and the stage folders they
        name: fine-tuned model.ckpt, labels.json, tokenizer/, personas centers.npy). GPU when there is one.
        A missing piece raises MissingRunFileError naming the file."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise MissingRunFileError(f"{run_dir}: no such run directory")
        metrics = json.loads(_need(run_dir / "metrics.json", "the run's metrics").read_text())
        cfg_path = _need(run_dir / "run_config.yaml",
                         "the run's resolved config; runs from before it existed: re-run the same "
                         "`python train.py ...` command, which reuses every cached stage and writes it")
        config = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
        for key in ("seq_len", "recommend"):
            if key not in config:
                raise MissingRunFileError(f"{cfg_path}: no `{key}`")
        if config["recommend"].get("ranker") not in ("count", "prob"):
            raise ValueError(f"{cfg_path}: recommend.ranker={config['recommend'].get('ranker')!r} ranks by the "
                             "training users' usage, which a run dir does not hold; the API scores runs trained "
                             "with recommend.ranker=count (the paper) or prob")
        stage_dirs = metrics.get("stage_dirs", {})
        ft = _stage_dir(run_dir, stage_dirs, "finetune")
        for f, what in (("model.ckpt", "fine-tuned checkpoint"), ("labels.json", "class names of the heads"),
                        ("tokenizer/tokenizer.json", "the run's tokenizer")):
            _need(ft / f, what)
        pe = _stage_dir(run_dir, stage_dirs, "personas")
        centers = np.load(_need(pe / "centers.npy", "persona cluster centres"))
        pm = metrics.get("personas") or json.loads(_need(pe / "metrics.json", "persona metrics").read_text())
        mapping = {str(k): v for k, v in (pm.get("mapping") or {}).items()}
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        module, tok, labels = P.load_finetuned(ft, dev)
        bs = batch_size or int((config.get("runtime") or {}).get("eval_batch_size", 256))
        # training serialised billing metadata only when its data had a billing table
        data_dir = stage_dirs.get("data")
        billed = True if data_dir is None or not Path(data_dir).exists() else (Path(data_dir) / "billing.parquet").exists()
        return cls(module, tok, labels, centers, mapping, config, stage_dirs, dev, bs, ft / "tokenizer", billed)

    # ---- scoring ------------------------------------------------------------------------------------
    def context(self, cutoff=None, billing_path: str | Path | None = None) -> Context:
        """What `sessionbert.data.userbatch` needs to prepare users for this run (picklable, for workers)."""
        if self.tokenizer_dir is None:
            raise MissingRunFileError("this SessionBERT was not loaded from a run dir (no tokenizer folder)")
        from .data.serialize import SessionEncoder

        enc = SessionEncoder(self.tok, self.seq_len)
        return Context(self.tokenizer_dir, self.seq_len, list(self.labels.services),
                       None if cutoff is None else P._utc(cutoff), (enc.sep_id, enc.cls_id, enc.end_id),
                       self.use_region, self.use_billing, None if billing_path is None else str(billing_path))

    def predict(self, events: pd.DataFrame, billing: pd.DataFrame | None = None, cutoff=None,
                top_pages: int = 5) -> pd.DataFrame:
        """One row per user of `events` (event schema: user_id, session_id, timestamp, service, page, optional
        page_title, action, region; `billing` optional: user_id, month, service, spend_usd), columns `COLUMNS`:

        - persona (None without a persona catalogue), cluster, persona_similarity: cosine of the user embedding
          (mean of the user's session embeddings before `cutoff`) to the nearest persona centre;
        - new_services / new_service_scores (summed probability) / new_service_counts (how many of the last
          `recommend.last_sessions` sessions recommended it): top `recommend.k` services not used before `cutoff`;
        - next_pages / next_page_probs: top `top_pages` next pages after the user's latest session;
        - skipped_reason: why a user was not scored (no sessions starting before `cutoff`), else None.

        Only sessions starting before `cutoff` (a timestamp, naive = UTC; None = all) are used, whole, as the
        pipeline assigns sessions to windows by their first event; services used before `cutoff` are not
        recommended again. Users without bills (or all users when `billing` is None) carry the metadata of an
        unbilled user ("tier none"), as training did for users without bills: pass the billing table when the run
        was trained with one. Users come out sorted by user_id.
        """
        if len(events) == 0:
            return _frame(_empty_table())
        ev = pa.Table.from_pandas(_event_columns(events), preserve_index=False)
        bill = None if billing is None else pa.Table.from_pandas(
            billing[[c for c in ("user_id", "month", "service", "spend_usd") if c in billing]], preserve_index=False)
        prepared = prepare(ev, bill, self.context(cutoff))
        return _frame(self.score(prepared, top_pages))

    def score(self, prepared: Prepared, top_pages: int = 5) -> pa.Table:
        """The output table (`COLUMNS`) of one prepared batch of users (`sessionbert.data.userbatch.prepare`)."""
        from .personas.cluster import assign
        from .score import score_users

        U = len(prepared.users)
        scored = prepared.n_sessions > 0
        sc = score_users(self.module, prepared.ids, prepared.offsets, prepared.sess_user, U, prepared.used,
                         self.labels.services, self.labels.pages, self.rec_cfg, self.device, self.max_tokens,
                         self.tok.pad_token_id, embed=self.centers is not None, embed_module=self.persona_module,
                         top_pages=top_pages, packed=self.packed)
        pg = sc.pages if sc.pages is not None else np.zeros((U, 0), np.int64)
        pgp = sc.page_probs if sc.page_probs is not None else np.zeros((U, 0), np.float32)
        cluster = np.full(U, -1, np.int64)
        sim = np.full(U, np.nan)
        if sc.embedding is not None and scored.any():
            cl, sm = assign(sc.embedding[scored], self.centers)
            cluster[scored], sim[scored] = cl, sm
        persona = np.array([self.mapping.get(str(int(c))) if c >= 0 else None for c in cluster], dtype=object)
        services = np.asarray(self.labels.services, dtype=object)
        pages = np.asarray(self.labels.pages, dtype=object)
        return pa.table({
            "user_id": pa.array(prepared.users.astype(str), pa.string()),
            "n_sessions": pa.array(prepared.n_sessions.astype(np.int64)),
            "persona": pa.array(persona, pa.string()),
            "cluster": pa.array(cluster, pa.int64(), mask=cluster < 0),
            "persona_similarity": pa.array(sim, pa.float64(), mask=~scored),
            "new_services": _lists(services, sc.services, sc.services >= 0, pa.string()),
            "new_service_scores": _lists(None, sc.mass, sc.services >= 0, pa.float64()),
            "new_service_counts": _lists(None, sc.counts, sc.services >= 0, pa.int64()),
            "next_pages": _lists(pages, pg, scored[:, None] & np.ones_like(pg, bool), pa.string()),
            "next_page_probs": _lists(None, pgp.astype(np.float64), scored[:, None] & np.ones_like(pg, bool),
                                      pa.float64()),
            "skipped_reason": pa.array(np.where(scored, None, SKIP_NO_HISTORY).astype(object), pa.string()),
        })

    def predict_batches(self, events: pd.DataFrame, billing: pd.DataFrame | None = None, cutoff=None,
                        batch_users: int = 1000, top_pages: int = 5) -> Iterator[pd.DataFrame]:
        """`predict` over `batch_users` users at a time (only one batch is serialised and encoded at once)."""
        for ev, bill in iter_user_batches(events, billing, batch_users):
            yield self.predict(ev, bill, cutoff, top_pages)

    def recommend_file(self, events_path: str | Path, billing_path: str | Path | None = None, cutoff=None,
                       top_pages: int = 5, workers: int = 0, batch_rows: int = 1_000_000,
                       block_bytes: int | None = None) -> Iterator[pa.Table]:
        """Score an event file or folder streamed in batches of whole users, yielding one output table (`COLUMNS`)
        per batch in input order; memory holds a few batches, never the input. The input must hold each user's
        rows together (e.g. sorted by user_id); a user found again later is BadInputError naming the file and
        line (Parquet: row), as is a bad row (`file:line: reason`, as `io.read_events` words it).

        - A single Parquet file (billing Parquet or none) is cut into splits of whole row groups (about
          `batch_rows` rows each, `userbatch.plan_splits`); with `workers` > 0 a pool of that many processes reads,
          validates, serialises and tokenises the splits while this process runs the model.
        - CSV / JSONL files and folders (or a Parquet file with a CSV / JSONL billing table) are read here in
          blocks (`block_bytes`, default 4 MiB of text) by `io.stream_events`, validated and cut into tables of
          about `batch_rows` rows of whole users; `workers` processes serialise and tokenise them.

        At most 2 batches per worker are in flight. `billing_path`: a Parquet billing table is read per batch for
        its users (row-group statistics); a CSV / JSONL one is read whole (`io.read_billing`) first."""
        from .data.io import _format_of, read_billing, stream_events
        from .data.userbatch import BillsByUser, plan_splits, prepare_frame, prepare_split

        events_path = Path(events_path)
        billing_pq = billing_path is not None and Path(billing_path).is_file() and \
            _format_of(Path(billing_path)) == "parquet"
        if events_path.is_file() and _format_of(events_path) == "parquet" and (billing_path is None or billing_pq):
            ctx = self.context(cutoff, billing_path)
            path = str(events_path)
            tasks = ((prepare_split, (path, a, b, ctx)) for a, b in plan_splits(path, batch_rows))
            seen: set[str] = set()
            for p in self._prepared(tasks, workers):
                again = [u for u in p.users.tolist() if u in seen]
                if again:
                    from .data.io import BadInputError, reappears_message

                    i = p.users.tolist().index(again[0])
                    raise BadInputError(reappears_message(events_path, again[0], int(p.first_line[i])))
                seen.update(p.users.tolist())
                yield self.score(p, top_pages)
            return
        ctx = self.context(cutoff, billing_path if billing_pq else None)
        bills = None
        if billing_path is not None and not billing_pq:
            bills = BillsByUser(read_billing(billing_path)[0])
        kw = {} if block_bytes is None else {"block_bytes": block_bytes}
        tasks = ((prepare_frame, (t, ctx, None if bills is None else bills.of(t["user_id"])))
                 for t in stream_events(events_path, batch_rows, **kw))
        for p in self._prepared(tasks, workers):
            yield self.score(p, top_pages)

    @staticmethod
    def _prepared(tasks: Iterator[tuple], workers: int) -> Iterator[Prepared]:
        """Run `(fn, args)` tasks (fn returns a Prepared) in this process, or in a pool of `workers` spawned
        processes with at most 2 tasks per worker in flight; results in task order."""
        tasks = iter(tasks)
        if workers <= 0:
            for fn, args in tasks:
                yield fn(*args)
            return
        import multiprocessing as mp
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        from .data.userbatch import init_worker

        # A process pool (not torch's DataLoader): the tasks are independent and results must come back in input
        # order; spawn, since this process may hold CUDA.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=init_worker) as pool:
            pending: deque = deque(pool.submit(fn, *args) for fn, args in itertools.islice(tasks, 2 * workers))
            while pending:
                p = pending.popleft().result()
                for fn, args in itertools.islice(tasks, 1):
                    pending.append(pool.submit(fn, *args))
                yield p

    # ---- export -------------------------------------------------------------------------------------
    def export_hf(self, out: str | Path) -> Path:
        """The fine-tuned encoder and the tokenizer in Hugging Face format (AutoModel / AutoTokenizer load it),
        plus the heads (`heads.pt`), their class names (`labels.json`) and `sessionbert.json` (seq_len, ...)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        enc = copy.deepcopy(self.module.encoder).cpu()
        enc.save_pretrained(str(out))
        self.tok.save_pretrained(str(out))
        torch.save({"page_head": self.module.page_head.state_dict(),
                    "service_head": self.module.service_head.state_dict(),
                    "pooling": self.module.hparams.pooling}, out / "heads.pt")
        (out / "labels.json").write_text(json.dumps(self.labels.to_dict()))
        (out / "sessionbert.json").write_text(json.dumps(
            {"seq_len": self.seq_len, "recommend": self.rec_cfg, "metadata": self.use_region,
             "billing": self.use_billing, "output": "last_hidden_state; session embedding = mean over attention_mask"},
            indent=2))
        return out

    def export_onnx(self, path: str | Path, opset: int = 17) -> Path:
        """The encoder as ONNX: inputs input_ids, attention_mask (int64, dynamic batch and sequence),
        output last_hidden_state (batch, sequence, hidden). TorchScript exporter (dynamo=False)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        wrapper = _EncoderOnly(copy.deepcopy(self.module.encoder).cpu().float().eval())
        ids = torch.full((2, 16), self.tok.cls_token_id, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        torch.onnx.export(wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=opset, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}})
        return path


class _EncoderOnly(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def iter_user_batches(events: pd.DataFrame, billing: pd.DataFrame | None, batch_users: int):
    """(events, billing) of `batch_users` users at a time, users in order of first appearance."""
    if batch_users < 1:
        raise ValueError(f"batch_users must be >= 1, got {batch_users}")
    codes, users = pd.factorize(events["user_id"], sort=False)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(0, len(users) + batch_users, batch_users))
    if billing is not None:
        bcodes = pd.Index(users).get_indexer(billing["user_id"])
        border = np.argsort(bcodes, kind="stable")
        bsorted = bcodes[border]
    for i in range(0, len(users), batch_users):
        lo, hi = starts[i // batch_users], starts[i // batch_users + 1]
        ev = events.iloc[order[lo:hi]]
        bill = None
        if billing is not None:
            blo, bhi = np.searchsorted(bsorted, [i, min(i + batch_users, len(users))])
            bill = billing.iloc[border[blo:bhi]]
        yield ev, bill


_LIST_COLUMNS = ("new_services", "new_service_scores", "new_service_counts", "next_pages", "next_page_probs")


def _lists(names: np.ndarray | None, values: np.ndarray, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A list column from a padded (U, k) array: row u holds values[u][valid[u]] (mapped through names)."""
    valid = np.asarray(valid, bool).reshape(len(values), -1) if len(values) else np.zeros((0, 0), bool)
    offs = np.zeros(len(values) + 1, np.int32)
    np.cumsum(valid.sum(1), out=offs[1:])
    flat = np.asarray(values)[valid] if len(values) else np.zeros(0)
    if names is not None:
        flat = names[flat.astype(np.int64)] if len(flat) else np.zeros(0, object)
    return pa.ListArray.from_arrays(pa.array(offs), pa.array(flat, typ))


def _empty_table() -> pa.Table:
    return pa.table({c: pa.array([], t) for c, t in zip(COLUMNS, (
        pa.string(), pa.int64(), pa.string(), pa.int64(), pa.float64(), pa.list_(pa.string()),
        pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.string()), pa.list_(pa.float64()), pa.string()))})


OUTPUT_SCHEMA = _empty_table().schema


def _event_columns(events: pd.DataFrame) -> pd.DataFrame:
    from .data.schema import EVENT_SCHEMA

    ev = events[[c for c in EVENT_SCHEMA.names if c in events]].copy()
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], utc=True)
    return ev


def _frame(table: pa.Table) -> pd.DataFrame:
    """The output table as pandas (list cells as Python lists, cluster nullable Int64, missing text None)."""
    df = table.to_pandas()
    for c in _LIST_COLUMNS:
        df[c] = table.column(c).to_pylist()
    df["cluster"] = df["cluster"].astype("Int64")
    df["persona_similarity"] = df["persona_similarity"].astype("float64")
    df["n_sessions"] = df["n_sessions"].astype("int64")
    for c in ("user_id", "persona", "skipped_reason"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df
