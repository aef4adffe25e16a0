"""Use a trained SessionBERT: persona and top-5 new services for anyone's session log, and export.

    from sessionbert.inference import SessionBERT
    model = SessionBERT.from_run("outputs/2026-11-28/12-00-00")
    table = model.predict(events, billing=None, cutoff="2026-03-01")   # one row per user

`predict` runs exactly the pipeline's evaluation path (`sessionbert.pipeline.serialise_events` ->
`recommend_sessions` / `embed_users`, i.e. serialisation -> SessionEncoder -> infer -> recommend), so scoring the
pipeline's own users with cutoff = the split's test start reproduces its `recommend.hit@5`.

Unknown services, pages and actions (never seen in training) need no special handling: their text is split by
the run's WordPiece tokenizer exactly as in training, and word pieces outside its vocabulary become [UNK]; a
service never seen as a training target simply can never be recommended (the heads only know training classes).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from . import pipeline as P

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
                 config: dict, stage_dirs: dict, device: torch.device, batch_size: int = 256):
        self.module, self.tok, self.labels = module, tokenizer, labels
        self.centers, self.mapping = centers, mapping
        self.config, self.stage_dirs = config, stage_dirs
        self.device, self.batch_size = device, batch_size
        self.seq_len = int(config["seq_len"])
        self.rec_cfg = dict(config["recommend"])
        tcfg = config.get("tokenizer", {}) or {}
        self.use_region, self.use_billing = bool(tcfg.get("metadata", True)), bool(tcfg.get("billing", True))
        emb = (config.get("personas", {}) or {}).get("embedding", "finetuned")
        self.persona_module = module
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
        return cls(module, tok, labels, centers, mapping, config, stage_dirs, dev, bs)

    # ---- scoring ------------------------------------------------------------------------------------
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
        recommended again. Without `billing`, sessions carry the metadata of an unbilled user ("tier none"), as
        training did for users without bills: pass the billing table when the run was trained with one.
        """
        from .data.split import used_and_adopted
        from .personas.cluster import assign

        if len(events) == 0:
            return _frame([])
        corpus = P.serialise_events(events, billing, cutoff, self.use_region, self.use_billing)
        used, _ = used_and_adopted(corpus.events, corpus.split)
        hist = P.history_sessions(corpus)
        n_sess = corpus.sessions["user_id"].iloc[hist].value_counts().to_dict()
        all_users = pd.unique(corpus.sessions["user_id"])
        rows: dict[str, dict] = {u: {"user_id": u, "n_sessions": int(n_sess.get(u, 0)),
                                     "skipped_reason": None if u in n_sess else SKIP_NO_HISTORY} for u in all_users}
        if len(hist):
            recs, users, _, out = P.recommend_sessions(self.module, self.tok, self.labels, corpus, used, self.seq_len,
                                                       self.rec_cfg, self.batch_size, self.device)
            for u, r in recs.items():
                rows[u].update(new_services=[s for s, _, _ in r], new_service_scores=[float(p) for _, _, p in r],
                               new_service_counts=[int(c) for _, c, _ in r])
            # the user's latest session is the last of its block (corpus order: per user, oldest first)
            latest = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
            pages = np.asarray(self.labels.pages, dtype=object)
            probs = np.where(np.array([not p.startswith("[") for p in pages])[None, :], out["page"][latest], -1.0)
            top = np.argsort(-probs, axis=1, kind="stable")[:, :top_pages]
            for u, cols, p in zip(users[latest], top, probs):
                rows[u].update(next_pages=list(pages[cols]), next_page_probs=[float(x) for x in p[cols]])
            uemb = P.embed_users(self.persona_module, self.tok, corpus, self.seq_len, self.batch_size, self.device)
            if self.centers is not None:
                cl, sim = assign(uemb.to_numpy(), self.centers)
                for u, c, s in zip(uemb.index, cl, sim):
                    rows[u].update(cluster=int(c), persona=self.mapping.get(str(int(c))), persona_similarity=float(s))
        return _frame(list(rows.values()))

    def predict_batches(self, events: pd.DataFrame, billing: pd.DataFrame | None = None, cutoff=None,
                        batch_users: int = 1000, top_pages: int = 5) -> Iterator[pd.DataFrame]:
        """`predict` over `batch_users` users at a time (only one batch is serialised and encoded at once)."""
        for ev, bill in iter_user_batches(events, billing, batch_users):
            yield self.predict(ev, bill, cutoff, top_pages)

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


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in ("new_services", "new_service_scores", "new_service_counts", "next_pages", "next_page_probs"):
        df[c] = [v if isinstance(v, list) else [] for v in df[c]]
    df["cluster"] = df["cluster"].astype("Int64")
    df["persona_similarity"] = df["persona_similarity"].astype("float64")
    df["n_sessions"] = df["n_sessions"].astype("int64")
    for c in ("user_id", "persona", "skipped_reason"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df
