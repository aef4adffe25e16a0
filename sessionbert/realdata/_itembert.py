"""A small BERT encoder over item tokens, its MLM / next-item training loops, and rank metrics (msweb, Beauty).

Torch and numpy only, so the same module runs on a bare GPU machine (experiments/real_beauty_gpu.sh).
The encoder is BERT's layer stack (post-LN, GELU, 4x feed-forward) from ``torch.nn.TransformerEncoderLayer``,
because that layer takes a causal mask natively (SASRec-style next-item targets at every position) and the
per-epoch full-ranking evaluation needs our own loop anyway; the output layer is BERT's MLM head (dense, GELU,
LayerNorm, decoder tied to the token embeddings).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PAD, MASK = 0, 1  # token ids; items/areas start at FIRST
FIRST = 2


@dataclass
class EncoderCfg:
    n_items: int  # item/area vocabulary (tokens FIRST .. FIRST + n_items - 1)
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50  # 0: no position embeddings (order-free sets)
    dropout: float = 0.2
    emb_dropout: float | None = None  # defaults to dropout
    n_attrs: int = 0  # item metadata: attribute vocabulary (0 = none)


class ItemBert(nn.Module):
    """Token (+ optional attribute-bag) + position embeddings -> BERT layers -> MLM head tied to the item table."""

    def __init__(self, cfg: EncoderCfg, item_attrs: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.tok = nn.Embedding(FIRST + cfg.n_items, h, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, h) if cfg.max_len else None
        if cfg.n_attrs:
            if item_attrs is None:
                raise ValueError("n_attrs > 0 needs item_attrs (items x max attrs, 0-padded attribute ids + 1)")
            self.register_buffer("item_attrs", item_attrs, persistent=False)  # (FIRST + n_items, A)
            self.attr = nn.EmbeddingBag(cfg.n_attrs + 1, h, mode="mean", padding_idx=0)
        self.ln = nn.LayerNorm(h)
        self.drop = nn.Dropout(cfg.dropout if cfg.emb_dropout is None else cfg.emb_dropout)
        layer = nn.TransformerEncoderLayer(h, cfg.heads, 4 * h, cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.enc = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h))
        self.bias = nn.Parameter(torch.zeros(cfg.n_items))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # BERT's initialiser (normal 0.02)
        if isinstance(m, (nn.Linear, nn.Embedding, nn.EmbeddingBag)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def item_table(self) -> torch.Tensor:
        """(n_items, H) output embeddings of the items: token embedding plus the mean of its attributes'."""
        w = self.tok.weight[FIRST:]
        if self.cfg.n_attrs:
            w = w + self.attr(self.item_attrs[FIRST:])
        return w

    def forward(self, ids: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """ids (B, T) left-padded with PAD -> hidden states (B, T, H). Positions count back from the last slot
        (the most recent item is position 0), so a left-padded batch of any width is consistent."""
        x = self.tok(ids)  # (B, T, H)
        if self.cfg.n_attrs:
            bag = self.item_attrs[ids.clamp_min(0)]  # (B, T, A)
            x = x + self.attr(bag.flatten(0, 1)).view_as(x) * (ids >= FIRST).unsqueeze(-1)
        if self.pos is not None:
            t = ids.shape[1]
            if t > self.cfg.max_len:
                raise ValueError(f"sequence width {t} > max_len {self.cfg.max_len}")
            x = x + self.pos(torch.arange(t - 1, -1, -1, device=ids.device)).unsqueeze(0)
        x = self.drop(self.ln(x))
        pad = ids == PAD  # (B, T)
        if not causal:
            return self.enc(x, src_key_padding_mask=pad)
        # causal: slot i sees slots <= i that are not padding, and always itself (a padding slot that saw nothing
        # would give NaN, which then leaks through 0-weights into real slots)
        t = ids.shape[1]
        eye = torch.eye(t, dtype=torch.bool, device=ids.device)
        allowed = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril() & ~pad.unsqueeze(1) | eye  # (B, T, T)
        block = (~allowed).repeat_interleave(self.cfg.heads, dim=0)  # (B * heads, T, T), True = not allowed
        out = self.enc(x, mask=block)
        return out

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states -> (N, n_items) item logits (the MLM head, decoder tied to the item table)."""
        return self.head(h) @ self.item_table().T + self.bias


def left_pad(seqs: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """Token lists -> (B, T) LongTensor, left-padded with PAD, each row truncated to its last `width` tokens."""
    w = width or max(len(s) for s in seqs)
    out = torch.full((len(seqs), w), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[-w:]
        if s:
            out[i, w - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------------------------
# rank metrics (single or several held-out items per case). Written here because the lists are ranked over the
# whole catalogue with some items excluded; tests check them against torchmetrics' retrieval metrics.

def ranks_of_targets(scores: np.ndarray, targets: np.ndarray, exclude: list[Sequence[int]] | None = None) -> np.ndarray:
    """1-based rank of each case's single target among all items (ties count against the target: an item
    with an equal score ranks above it, so constant scores cannot score by luck). Excluded items do not count.

    scores (N, I) float; targets (N,) item column indices; exclude[i]: columns removed from case i's ranking."""
    s = np.array(scores, dtype=np.float32, copy=True)
    if exclude is not None:
        for i, ex in enumerate(exclude):
            if len(ex):
                s[i, list(ex)] = -np.inf
    t = s[np.arange(len(s)), targets]
    if np.isneginf(t).any():
        raise ValueError("a target item is also excluded")
    return (s >= t[:, None]).sum(1)  # counts the target itself: rank 1 = nothing else scores as high


def hr_ndcg(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """HR@k and NDCG@k for one relevant item per case (NDCG = 1 / log2(rank + 1) when rank <= k)."""
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float((hit / np.log2(ranks + 1.0)).mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# training loops

def info_nce(a: torch.Tensor, b: torch.Tensor, temp: float) -> torch.Tensor:
    """In-batch InfoNCE between two views (B, H), (B, H): row i of a and of b are positives, the other 2B - 2
    rows negatives; dot-product similarity / temp (as DuoRec)."""
    z = torch.cat([a, b])  # (2B, H)
    sim = z @ z.T / temp  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def length_batches(lengths: Sequence[int], batch_size: int, g: np.random.Generator, chunk_batches: int = 50):
    """Shuffled batches of indices, each drawn from a length-sorted chunk of `chunk_batches` batches, so a batch
    pads to little (most sets/sequences are short, a few are long); batch order shuffled."""
    order = g.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    out = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda j: lengths[j])
        out.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [out[i] for i in g.permutation(len(out))]


class cpu_threads:
    """Context: torch intra-op threads for a CPU run (1 is several times faster than 2 on our shared 2-core
    machine for these small matrices; measured 0.2 s vs 3.3 s per MLM step). Restored on exit."""

    def __init__(self, n: int | None):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Best:
    """The best validation state so far, for early stopping with `patience` (0: never stop early)."""

    def __init__(self, patience: int):
        self.patience, self.score, self.state, self.bad = patience, -math.inf, None, 0

    def update(self, score: float, model: nn.Module) -> bool:
        """Record `score`; True when training should stop."""
        if score > self.score:
            self.score, self.bad = score, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def train_sets_mlm(model: ItemBert, sets: list[list[int]], *, epochs: int, batch_size: int, lr: float,
                   mask_prob: float, weight_decay: float, seed: int, device: str = "cpu",
                   evaluate: Callable[[ItemBert], float] | None = None, patience: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """MLM over sets of tokens (no positions): each epoch every set (>= 2 items) gets a random subset masked
    (each item with `mask_prob`, at least one masked and one kept); the masked slots predict their items with
    the items still shown excluded from the softmax (they cannot be the answer: the same rule as at test).
    `evaluate(model) -> score` after each epoch keeps the best state (early stopping with `patience`)."""
    dev = _device(device)
    model.to(dev)
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    usable = [np.asarray(s) for s in sets if len(s) >= 2]
    best, hist = _Best(patience), []
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        tot = n = 0
        for batch in length_batches([len(u) for u in usable], batch_size, g):
            rows, targets, owners = [], [], []
            for r, j in enumerate(batch):
                s = usable[j]
                m = g.random(len(s)) < mask_prob
                if m.all():
                    m[g.integers(len(s))] = False
                if not m.any():
                    m[g.integers(len(s))] = True
                rows.append(np.where(m, MASK, s + FIRST))
                targets.extend(s[m])
                owners.extend([r] * int(m.sum()))
            ids = left_pad(rows).to(dev)  # (B, T)
            h = model(ids)  # (B, T, H)
            logits = model.scores(h[ids == MASK])  # (M, I): row order = masked slots in row-major order
            shown = torch.zeros(len(rows), model.cfg.n_items, dtype=torch.bool, device=dev)
            shown_ids = (ids - FIRST).clamp_min(0)
            shown.scatter_(1, shown_ids, ids >= FIRST)
            logits = logits.masked_fill(shown[torch.as_tensor(owners, device=dev)], -1e9)
            loss = F.cross_entropy(logits, torch.as_tensor(np.asarray(targets), device=dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(targets)
            n += len(targets)
        score = evaluate(model) if evaluate else -tot / n
        hist.append({"epoch": ep + 1, "loss": tot / n, "val": score, "s": round(time.time() - t0, 1)})
        log(f"  epoch {ep + 1}: loss {tot / n:.4f} val {score:.4f} ({time.time() - t0:.0f}s)")
        if best.update(score, model):
            break
    best.restore(model)
    return {"history": hist, "best_val": best.score, "seconds": time.time() - t0}


def train_next_item(model: ItemBert, seqs: list[list[int]], *, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int, device: str = "cpu", mlm_epochs: int = 0,
                    mlm_prob: float = 0.2, label_smoothing: float = 0.0, cl_weight: float = 0.0,
                    cl_temp: float = 1.0,
                    evaluate: Callable[[ItemBert], float] | None = None, eval_every: int = 1, patience: int = 0,
                    time_budget_s: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Optional short MLM pretraining (bidirectional, mask `mlm_prob` of items, predict them), then next-item
    training: causal attention, at every position the next item as target, full softmax over all items.
    `seqs` are item-column lists (0-based). Best state by `evaluate(model)` is kept (early stopping).
    `time_budget_s` > 0: stop next-item training after the first evaluation past that many seconds.
    `cl_weight` > 0: add DuoRec's (Qiu et al., WSDM 2022) dropout-contrastive loss on the last slot's state."""
    dev = _device(device)
    model.to(dev)
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    w = model.cfg.max_len
    data = [np.asarray(s[-(w + 1):]) + FIRST for s in seqs if len(s) >= 2]
    hist, t0 = [], time.time()

    def batches():
        for b in length_batches([len(d) for d in data], batch_size, g):
            yield [data[j] for j in b]

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for ep in range(mlm_epochs):
        model.train()
        tot = n = 0
        for rows in batches():
            ids = left_pad(rows, w).to(dev)  # (B, T)
            m = (torch.rand(ids.shape, device=dev) < mlm_prob) & (ids >= FIRST)
            if not m.any():
                continue
            inp = ids.masked_fill(m, MASK)
            logits = model.scores(model(inp)[m])  # (M, I)
            loss = F.cross_entropy(logits, ids[m] - FIRST)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * int(m.sum())
            n += int(m.sum())
        hist.append({"stage": "mlm", "epoch": ep + 1, "loss": tot / max(n, 1), "s": round(time.time() - t0, 1)})
        log(f"  mlm epoch {ep + 1}: loss {tot / max(n, 1):.4f} ({time.time() - t0:.0f}s)")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = _Best(patience)
    for ep in range(epochs):
        model.train()
        tot = n = 0
        for rows in batches():
            full = left_pad(rows, w + 1).to(dev)  # (B, T+1)
            width = int((full != PAD).sum(1).max())
            full = full[:, -width:]
            inp, tgt = full[:, :-1], full[:, 1:]  # next item at every position
            keep = (inp >= FIRST) & (tgt >= FIRST)
            h = model(inp, causal=True)  # (B, T, H)
            logits = model.scores(h[keep])  # (N, I) only real positions
            loss = F.cross_entropy(logits, tgt[keep] - FIRST, label_smoothing=label_smoothing)
            if cl_weight:  # DuoRec's unsupervised contrastive term: a second dropout pass is the positive
                loss = loss + cl_weight * info_nce(h[:, -1], model(inp, causal=True)[:, -1], cl_temp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * int(keep.sum())
            n += int(keep.sum())
        rec = {"stage": "next", "epoch": ep + 1, "loss": tot / n, "s": round(time.time() - t0, 1)}
        if evaluate and ((ep + 1) % eval_every == 0 or ep + 1 == epochs):
            score = evaluate(model)
            rec["val"] = score
            log(f"  epoch {ep + 1}: loss {tot / n:.4f} val {score:.4f} ({time.time() - t0:.0f}s)")
            if best.update(score, model):
                hist.append(rec)
                break
            if time_budget_s and time.time() - t0 > time_budget_s:
                hist.append(rec)
                log(f"  time budget {time_budget_s:.0f}s reached: stopping")
                break
        else:
            log(f"  epoch {ep + 1}: loss {tot / n:.4f} ({time.time() - t0:.0f}s)")
        hist.append(rec)
    best.restore(model)
    return {"history": hist, "best_val": best.score, "seconds": time.time() - t0}


@torch.no_grad()
def score_batches(model: ItemBert, seqs: list[list[int]], *, causal: bool, append_mask: bool,
                  batch_size: int = 512, device: str = "cpu"):
    """Yield (row indices, (b, n_items) float32 item logits) read at the last slot of each (0-based item)
    sequence, in length-sorted batches (little padding). `append_mask`: add a [MASK] slot after the items and
    read it (MLM-style inference). Batches keep memory at batch x items (Beauty: 22k x 12k would be 1 GB)."""
    dev = _device(device)
    model.to(dev).eval()
    w = model.cfg.max_len or None
    order = np.argsort([len(x) for x in seqs], kind="stable")
    for b in range(0, len(seqs), batch_size):
        idx = order[b:b + batch_size]
        rows = [np.asarray(seqs[i], dtype=np.int64) + FIRST for i in idx]
        if append_mask:
            rows = [np.append(r, MASK) for r in rows]
        ids = left_pad(rows, w).to(dev)
        width = int((ids != PAD).sum(1).max())
        ids = ids[:, -width:]
        h = model(ids, causal=causal)[:, -1]  # (B, H)
        yield idx, model.scores(h).float().cpu().numpy()


def last_hidden_scores(model: ItemBert, seqs: list[list[int]], **kw) -> np.ndarray:
    """All of `score_batches` as one (N, n_items) array (small catalogues: msweb's 294 areas)."""
    out = np.zeros((len(seqs), model.cfg.n_items), dtype=np.float32)
    for idx, sc in score_batches(model, seqs, **kw):
        out[idx] = sc
    return out
