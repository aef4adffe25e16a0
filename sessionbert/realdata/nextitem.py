"""SessionBERT for next-item prediction on public id-vocabulary data (issue 5).

One token per item (page category, page id, activity): the vocabulary is the dataset's items plus [PAD] and
[MASK]. WordPiece is not needed here (the items are opaque ids, not text: there is nothing to split into
sub-words), so the token id of item i is simply i + N_SPECIAL.

Model: a BERT encoder (``models.encoder.bert_config`` -> transformers ``BertForMaskedLM``) trained in two phases
on the same weights:

1. MLM pretraining on training sequences (windows of at most ``max_len`` items, BERT masking with probability
   ``mlm_prob``, at least one masked item per window, and with probability ``mask_last_prob`` the last item
   masked too, the BERT4Rec trick that brings pretraining close to the downstream task);
2. next-item fine-tuning: every prefix of every training sequence, written as ``prefix + [MASK]`` (left-padded
   to ``max_len``, so [MASK] always sits at the last position), the MLM head at [MASK] predicts the next item
   (cross-entropy over items). With ``ahead: k`` > 1 the target is "any of the next k items" (loss
   -log sum_j p(item_{t+j})): the objective of a protocol that scores a hit when the prediction is in the
   next k items (CPT+ MSNBC, suffix 2).

Plain torch loop (no Lightning: a few thousand tiny steps on CPU, where the Trainer's overhead dominates);
deterministic for a seed (torch.manual_seed + seeded numpy shuffles, single-process CPU kernels).
Optional early stopping: ``val_frac`` of the training sequences held out, the fine-tuning epoch with the best
held-out next-item accuracy is kept (no test data involved).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM, get_linear_schedule_with_warmup

from ..models.encoder import ARCHS, bert_config

log = logging.getLogger("sessionbert")

PAD, MASK = 0, 1
N_SPECIAL = 2

DEFAULTS: dict = {
    "arch": "tiny",  # a name in models.encoder.ARCHS or a dict (hidden_size, num_hidden_layers, ...)
    "max_len": 16,  # tokens per input: at most max_len - 1 prefix items + [MASK]
    "dropout": 0.1,
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "warmup_ratio": 0.06,
    "mlm_epochs": 0,
    "mlm_prob": 0.2,
    "mask_last_prob": 0.5,
    "mlm_max_windows": None,  # cap on MLM windows per epoch (random subset), None = all
    "ft_epochs": 5,
    "ft_max_samples": None,  # cap on fine-tuning prefixes per epoch (random subset), None = all
    "ft_max_pool": None,  # cap on prefixes materialised at all (uniform sample of every prefix), None = all
    "ahead": 1,
    "label_smoothing": 0.0,
    "val_frac": 0.0,
    "patience": 2,
    "threads": 1,  # 1: on a shared 2-core CPU, 2 threads per tiny step was ~7x slower (contention), not faster
    "eval_batch_size": 2048,
}


def resolve_cfg(cfg: dict | None) -> dict:
    """Defaults overlaid with `cfg`; unknown keys raise (a typo would otherwise be silently ignored)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"nextitem config: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if out["max_len"] < 2:
        raise ValueError(f"nextitem config: max_len must be >= 2, got {out['max_len']}")
    if out["ahead"] < 1:
        raise ValueError(f"nextitem config: ahead must be >= 1, got {out['ahead']}")
    return out


def _arch(a) -> dict:
    if isinstance(a, str):
        if a not in ARCHS:
            raise ValueError(f"nextitem config: arch {a!r} not in {sorted(ARCHS)}")
        return dict(ARCHS[a])
    return {k: int(v) for k, v in dict(a).items()}


def encode_prefixes(prefixes: list[list[int]], max_len: int) -> np.ndarray:
    """(n, max_len) int64 token ids: the last max_len - 1 items of each prefix then [MASK], left-padded."""
    out = np.zeros((len(prefixes), max_len), dtype=np.int64)
    out[:, -1] = MASK
    keep = max_len - 1
    for r, p in enumerate(prefixes):
        tail = p[-keep:] if keep else []
        if len(tail):
            out[r, keep - len(tail):keep] = np.asarray(tail, dtype=np.int64) + N_SPECIAL
    return out


def _windows(seqs: list[list[int]], max_len: int) -> np.ndarray:
    """(W, max_len) left-padded item tokens: each sequence cut into consecutive windows of max_len items."""
    rows = []
    for s in seqs:
        for lo in range(0, max(len(s), 1), max_len):
            w = s[lo:lo + max_len]
            if len(w) >= 2:
                rows.append(w)
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    for r, w in enumerate(rows):
        out[r, max_len - len(w):] = np.asarray(w, dtype=np.int64) + N_SPECIAL
    return out


def _ft_samples(seqs: list[list[int]], max_len: int, ahead: int, pool: int | None = None,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix (length >= 1) of every sequence: (P, max_len) inputs, (P, ahead) targets (-100 past the end).

    With `pool`, a uniform random sample of `pool` of those prefixes (millions on msnbc's 80% split)."""
    counts = np.array([max(len(s) - 1, 0) for s in seqs], dtype=np.int64)
    total = int(counts.sum())
    if pool is not None and total > pool:
        pos = np.sort((rng or np.random.default_rng(0)).choice(total, size=pool, replace=False))
        cum = np.cumsum(counts)
        which = np.searchsorted(cum, pos, side="right")
        ts = pos - (cum[which] - counts[which]) + 1
        pairs = zip(which.tolist(), ts.tolist())
    else:
        pairs = ((i, t) for i, s in enumerate(seqs) for t in range(1, len(s)))
    prefixes, targets = [], []
    for i, t in pairs:
        s = seqs[i]
        prefixes.append(s[max(0, t - max_len + 1):t])
        nxt = s[t:t + ahead]
        targets.append(list(nxt) + [-100] * (ahead - len(nxt)))
    x = encode_prefixes(prefixes, max_len)
    y = np.asarray(targets, dtype=np.int64).reshape(len(targets), ahead)
    return x, y


def _mask_batch(x: torch.Tensor, mlm_prob: float, mask_last_prob: float, n_vocab: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of item tokens (80% [MASK], 10% random item, 10% kept); >= 1 masked item per row."""
    items = x >= N_SPECIAL  # (B, T)
    r = torch.rand(x.shape, generator=gen)
    sel = items & (r < mlm_prob)
    # the last position (the next-item slot at fine-tuning time) with probability mask_last_prob
    last = torch.rand(x.shape[0], generator=gen) < mask_last_prob
    sel[:, -1] |= last & items[:, -1]
    # rows with nothing selected: select one random item position
    none = ~sel.any(1) & items.any(1)
    if none.any():
        score = torch.rand(x.shape, generator=gen).masked_fill(~items, -1.0)
        pick = score.argmax(1)
        sel[none, pick[none]] = True
    labels = torch.where(sel, x, torch.full_like(x, -100))
    inp = x.clone()
    u = torch.rand(x.shape, generator=gen)
    inp[sel & (u < 0.8)] = MASK
    rnd = sel & (u >= 0.8) & (u < 0.9)
    inp[rnd] = torch.randint(N_SPECIAL, n_vocab, (int(rnd.sum()),), generator=gen)
    return inp, labels


@dataclass
class NextItemModel:
    """A trained model: `scores(prefixes)` -> (n, n_items) logits over items; `embed(seqs)` -> (n, H)."""

    model: BertForMaskedLM
    n_items: int
    cfg: dict
    history: list[dict] = field(default_factory=list)

    @torch.no_grad()
    def scores(self, prefixes: list[list[int]]) -> np.ndarray:
        self.model.eval()
        x = encode_prefixes(prefixes, self.cfg["max_len"])
        out = np.empty((len(x), self.n_items), dtype=np.float32)
        bs = self.cfg["eval_batch_size"]
        for lo in range(0, len(x), bs):
            xb = torch.from_numpy(x[lo:lo + bs])
            h = self.model.bert(input_ids=xb, attention_mask=(xb != PAD).long()).last_hidden_state[:, -1]  # (B, H)
            out[lo:lo + bs] = self.model.cls(h)[:, N_SPECIAL:].float().numpy()
        return out

    def predict(self, prefixes: list[list[int]], k: int = 1) -> np.ndarray:
        """(n, k) item indices, best first."""
        s = self.scores(prefixes)
        if k == 1:
            return s.argmax(1)[:, None]
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)

    @torch.no_grad()
    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        """(n, H) mean of the last hidden layer over each sequence's (last max_len) item tokens, no [MASK]."""
        from ..models.encoder import mean_pool

        self.model.eval()
        L = self.cfg["max_len"]
        x = np.zeros((len(seqs), L), dtype=np.int64)
        for r, s in enumerate(seqs):
            tail = s[-L:]
            if len(tail):
                x[r, L - len(tail):] = np.asarray(tail, dtype=np.int64) + N_SPECIAL
        outs = []
        bs = self.cfg["eval_batch_size"]
        for lo in range(0, len(x), bs):
            xb = torch.from_numpy(x[lo:lo + bs])
            m = (xb != PAD).long()
            outs.append(mean_pool(self.model.bert(input_ids=xb, attention_mask=m).last_hidden_state, m).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.model.config.hidden_size), np.float32)


def _update(net, opt, sched, loss) -> None:
    """One optimizer step: backward, clip the gradient norm at 1, step, advance the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()


def _optimizer(model, cfg: dict, total_steps: int):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])
    sched = get_linear_schedule_with_warmup(opt, int(math.ceil(cfg["warmup_ratio"] * total_steps)), total_steps)
    return opt, sched


def _subset(n: int, cap, rng: np.random.Generator) -> np.ndarray:
    idx = rng.permutation(n)
    return idx if cap is None or cap >= n else idx[:cap]


def _ft_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """logits (B, n_items), y (B, ahead) item indices (-100 = none): -log sum_j p(y_j)."""
    if y.shape[1] == 1:
        return F.cross_entropy(logits, y[:, 0], label_smoothing=label_smoothing)
    logp = F.log_softmax(logits, -1)
    valid = y >= 0
    g = logp.gather(1, y.clamp_min(0)).masked_fill(~valid, float("-inf"))  # (B, ahead)
    # the same item twice in the window counts once
    dup = torch.zeros_like(valid)
    for j in range(1, y.shape[1]):
        dup[:, j] = (y[:, j:j + 1] == y[:, :j]).any(1)
    g = g.masked_fill(dup, float("-inf"))
    return -torch.logsumexp(g, 1).mean()


@torch.no_grad()
def _accuracy(model: NextItemModel, x: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose top item is among their targets (the `ahead` window)."""
    model.model.eval()
    hits = 0
    bs = model.cfg["eval_batch_size"]
    for lo in range(0, len(x), bs):
        xb = torch.from_numpy(x[lo:lo + bs])
        h = model.model.bert(input_ids=xb, attention_mask=(xb != PAD).long()).last_hidden_state[:, -1]
        pred = model.model.cls(h)[:, N_SPECIAL:].argmax(1).numpy()
        hits += int((y[lo:lo + bs] == pred[:, None]).any(1).sum())
    return hits / max(1, len(x))


def fit_next_item(train_seqs: list[list[int]], n_items: int, cfg: dict | None = None, seed: int = 0,
                  pretrain_seqs: list[list[int]] | None = None, init: NextItemModel | None = None) -> NextItemModel:
    """MLM-pretrain (on `pretrain_seqs`, default the training sequences) then fine-tune for the next item.

    `train_seqs`: item indices in [0, n_items). With `init` (e.g. one MLM pretraining shared by the folds of
    a cross-validation, from ``pretrain_mlm``) training starts from a copy of its weights and skips MLM.
    Returns the fitted NextItemModel.
    """
    from ._itembert import cpu_threads

    cfg = resolve_cfg(cfg)
    with cpu_threads(cfg["threads"] or None):  # restored afterwards: a process-wide setting
        return _fit_next_item(train_seqs, n_items, cfg, seed, pretrain_seqs, init)


def _fit_next_item(train_seqs, n_items: int, cfg: dict, seed: int, pretrain_seqs, init) -> NextItemModel:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for s in train_seqs[:1000]:
        if len(s) and (min(s) < 0 or max(s) >= n_items):
            raise ValueError(f"fit_next_item: item index outside [0, {n_items})")
    L, V = cfg["max_len"], n_items + N_SPECIAL
    bcfg = bert_config(V, PAD, _arch(cfg["arch"]), max_position_embeddings=L, dropout=cfg["dropout"])
    net = BertForMaskedLM(bcfg)
    if init is not None:
        if init.n_items != n_items or init.cfg["max_len"] != L:
            raise ValueError("fit_next_item: init model has another item count or max_len")
        net.load_state_dict(init.model.state_dict())
    model = NextItemModel(net, n_items, cfg, history=list(init.history) if init is not None else [])
    t0 = time.perf_counter()

    # hold-out for early stopping (sequence level, so no prefix of a held-out sequence is trained on)
    seqs = list(train_seqs)
    val_x = val_y = None
    if cfg["val_frac"] > 0:
        perm = rng.permutation(len(seqs))
        n_val = max(1, int(round(cfg["val_frac"] * len(seqs))))
        val = [seqs[i] for i in perm[:n_val]]
        seqs = [seqs[i] for i in np.sort(perm[n_val:])]
        val_x, val_y = _ft_samples(val, L, cfg["ahead"])

    # ---- 1. MLM pretraining --------------------------------------------------------------------------
    if cfg["mlm_epochs"] > 0 and init is None:
        win = _windows(pretrain_seqs if pretrain_seqs is not None else seqs, L)
        per_epoch = len(_subset(len(win), cfg["mlm_max_windows"], rng))
        steps = cfg["mlm_epochs"] * math.ceil(per_epoch / cfg["batch_size"])
        opt, sched = _optimizer(net, cfg, steps)
        for ep in range(cfg["mlm_epochs"]):
            net.train()
            idx = _subset(len(win), cfg["mlm_max_windows"], rng)
            tot, nb = 0.0, 0
            for lo in range(0, len(idx), cfg["batch_size"]):
                xb = torch.from_numpy(win[idx[lo:lo + cfg["batch_size"]]])
                inp, labels = _mask_batch(xb, cfg["mlm_prob"], cfg["mask_last_prob"], V, gen)
                h = net.bert(input_ids=inp, attention_mask=(xb != PAD).long()).last_hidden_state
                sel = labels != -100
                loss = F.cross_entropy(net.cls(h[sel]), labels[sel])
                _update(net, opt, sched, loss)
                tot, nb = tot + loss.item(), nb + 1
            model.history.append({"phase": "mlm", "epoch": ep, "loss": tot / max(1, nb),
                                  "seconds": round(time.perf_counter() - t0, 1)})
            log.info("nextitem mlm epoch %d loss %.4f", ep, tot / max(1, nb))

    if cfg["ft_epochs"] == 0:
        net.eval()
        return model

    # ---- 2. next-item fine-tuning --------------------------------------------------------------------
    x, y = _ft_samples(seqs, L, cfg["ahead"], cfg["ft_max_pool"], rng)
    if len(x) == 0:
        raise ValueError("fit_next_item: no training prefix (every sequence has fewer than 2 items)")
    per_epoch = len(_subset(len(x), cfg["ft_max_samples"], rng))
    steps = max(1, cfg["ft_epochs"] * math.ceil(per_epoch / cfg["batch_size"]))
    opt, sched = _optimizer(net, cfg, steps)
    best, best_state, bad = -1.0, None, 0
    for ep in range(cfg["ft_epochs"]):
        net.train()
        idx = _subset(len(x), cfg["ft_max_samples"], rng)
        tot, nb = 0.0, 0
        for lo in range(0, len(idx), cfg["batch_size"]):
            b = idx[lo:lo + cfg["batch_size"]]
            xb, yb = torch.from_numpy(x[b]), torch.from_numpy(y[b])
            h = net.bert(input_ids=xb, attention_mask=(xb != PAD).long()).last_hidden_state[:, -1]  # (B, H)
            logits = net.cls(h)[:, N_SPECIAL:]  # (B, n_items)
            loss = _ft_loss(logits, yb, cfg["label_smoothing"])
            _update(net, opt, sched, loss)
            tot, nb = tot + loss.item(), nb + 1
        rec = {"phase": "finetune", "epoch": ep, "loss": tot / max(1, nb), "seconds": round(time.perf_counter() - t0, 1)}
        if val_x is not None:
            acc = _accuracy(model, val_x, val_y)
            rec["val_accuracy"] = acc
            if acc > best:
                best, best_state, bad = acc, copy.deepcopy(net.state_dict()), 0
            else:
                bad += 1
        model.history.append(rec)
        log.info("nextitem finetune %s", rec)
        if val_x is not None and bad >= cfg["patience"]:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return model


def pretrain_mlm(seqs: list[list[int]], n_items: int, cfg: dict | None = None, seed: int = 0) -> NextItemModel:
    """MLM pretraining only (cfg's mlm_* keys), e.g. once on sequences disjoint from every test fold, shared by
    the folds' ``fit_next_item(..., init=...)``."""
    cfg = {**resolve_cfg(cfg), "ft_epochs": 0, "val_frac": 0.0}
    if cfg["mlm_epochs"] < 1:
        raise ValueError("pretrain_mlm: mlm_epochs must be >= 1")
    return fit_next_item(seqs, n_items, cfg, seed, pretrain_seqs=seqs)
