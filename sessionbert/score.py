"""Scoring users with a fine-tuned SessionBERT: the one code path of the pipeline's evaluation (stage_recommend,
stage_personas) and of the user-facing API / `sessionbert recommend` (sessionbert.inference).

Input: the token ids of each user's sessions before the cut-off (ragged: `ids[offsets[i]:offsets[i+1]]`, sessions
grouped by user, oldest first). One encoder pass per session gives, at once:

- next-service probabilities of the user's last `recommend.last_sessions` sessions -> the paper's new-service
  recommender (`recommend.recommender.rank_new_services`: per-session top-k on the device, counting on the CPU);
- next-page probabilities of the user's latest session -> top next pages;
- the mean-pooled session embedding -> the user embedding (mean over the user's sessions) for the personas.

Sessions are encoded in length order (batches of <= `max_tokens` padded slots), so padding costs little; outputs
are put back in session order. On CUDA the encoder runs under bf16 autocast, as training did.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .models.encoder import mean_pool
from .recommend.recommender import rank_new_services, recommendable


def length_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Row indices in ascending length order, cut into batches of B x (longest in batch) <= max_tokens slots
    (a row longer than max_tokens is a batch of its own)."""
    order = np.argsort(lengths, kind="stable")
    L = np.asarray(lengths)[order].astype(np.int64)
    out, lo, n = [], 0, len(order)
    while lo < n:
        # (hi - lo) * L[hi - 1] grows with hi (L is sorted): the largest hi that fits, by bisection
        a, b = lo + 1, n
        while a < b:
            mid = (a + b + 1) // 2
            if (mid - lo) * L[mid - 1] <= max_tokens:
                a = mid
            else:
                b = mid - 1
        out.append(order[lo:a])
        lo = a
    return out


def pad_rows(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) int64 ids and (B, T) int64 attention mask of ragged rows `rows`, T = the longest (one gather)."""
    lo, ln = offsets[rows], offsets[rows + 1] - offsets[rows]
    T = int(ln.max()) if len(ln) else 0
    col = np.arange(T)[None, :]
    mask = col < ln[:, None]
    src = np.where(mask, lo[:, None] + col, 0)
    out = np.where(mask, ids[src] if len(ids) else 0, pad_id).astype(np.int64)
    return out, mask.astype(np.int64)


def pack_rows(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ragged rows `rows` end to end: (N,) int64 ids, (N,) int64 positions (restarting at 0 in each row) and
    (B + 1,) int32 row offsets, for the padding-free encoder (`models.packed.packed_hidden`)."""
    lo, ln = offsets[rows], offsets[rows + 1] - offsets[rows]
    cu = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(ln, out=cu[1:])
    pos = np.arange(cu[-1]) - np.repeat(cu[:-1], ln)
    return ids[np.repeat(lo, ln) + pos].astype(np.int64), pos, cu.astype(np.int32)


def _encode(encoder, ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int, device: torch.device,
            packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Last layer (B, T, H) and attention mask (B, T) of the sessions `rows` (call under `_autocast`).

    packed=False: the padded batch through the Hugging Face encoder. packed=True: the rows packed end to end through
    `packed_hidden` (variable-length FlashAttention on CUDA, no padding computed, bf16 residual stream under autocast;
    the same maths, tests/test_inference.py), then laid out as (B, T, H) for the heads and pooling."""
    if not packed:
        x, m = pad_rows(ids, offsets, rows, pad_id)
        x = torch.from_numpy(x).to(device, non_blocking=True)
        m = torch.from_numpy(m).to(device, non_blocking=True)
        return encoder(input_ids=x, attention_mask=m).last_hidden_state, m
    from .models.packed import packed_hidden, padded_index

    flat, pos, cu = pack_rows(ids, offsets, rows)
    T = int((cu[1:] - cu[:-1]).max())
    cu_t = torch.from_numpy(cu).to(device)
    h = packed_hidden(encoder, torch.from_numpy(flat).to(device), torch.from_numpy(pos).to(device), cu_t, T)
    idx, valid = padded_index(cu_t, T)
    return h[idx], valid.long()  # rows past a session's end repeat other tokens: the mask hides them


def use_packed(packed: bool | None, device: torch.device) -> bool:
    """packed=None (auto): the padding-free pass where the varlen kernel exists (CUDA: 1.31x users/s for BERT-base on
    an H200, experiments/results/bench_inference_packed_gpu.txt); on a CPU its padded fallback is slower (10.8 vs
    9.6 s padded for 3k users on 2 cores, bench_inference_packed_cpu.txt), so the padded pass."""
    if packed is None:
        from .models.packed import has_varlen_kernel

        return has_varlen_kernel(device)
    return bool(packed)


@dataclass
class UserScores:
    """Per user (in input order) and, for the recommender, per (user, rank)."""

    n_sessions: np.ndarray  # (U,) sessions scored
    services: np.ndarray  # (U, k) class index of the recommended new services, -1 = none
    counts: np.ndarray  # (U, k) times recommended among the last sessions
    mass: np.ndarray  # (U, k) summed probability
    pages: np.ndarray | None  # (U, top_pages) class index of the top next pages after the latest session
    page_probs: np.ndarray | None  # (U, top_pages)
    embedding: np.ndarray | None  # (U, H) float32 mean of the session embeddings


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def score_users(module, ids: np.ndarray, offsets: np.ndarray, sess_user: np.ndarray, n_users: int,
                used: np.ndarray, services: list[str], pages: list[str] | None, rec_cfg, device,
                max_tokens: int, pad_id: int, embed: bool = True, embed_module=None,
                top_pages: int = 5, packed: bool | None = None) -> UserScores:
    """Score `n_users` users from their sessions (`sess_user`: (S,) user index of each session, non-decreasing,
    sessions oldest first); `used` (U, C) bool: services (head classes) each user used before the cut-off.

    `embed_module`: the encoder for the user embeddings when it is not `module`'s (personas.embedding=pretrained);
    `embed=False` skips them (and encodes only the sessions the recommender needs). `pages=None` skips next pages.
    `packed`: the padding-free encoder (see `_encode`); None: on CUDA only (`use_packed`).
    """
    device = torch.device(device)
    packed = use_packed(packed, device)
    module.eval()
    S = len(sess_user)
    counts = np.bincount(sess_user, minlength=n_users)  # (U,)
    first = np.cumsum(counts) - counts
    pos_from_end = counts[sess_user] - (np.arange(S) - first[sess_user])  # 1 = the user's latest session
    rec_rows = pos_from_end <= int(rec_cfg["last_sessions"])
    latest = pos_from_end == 1
    same = embed and embed_module is None
    rows = np.arange(S) if same else np.flatnonzero(rec_rows)
    lengths = (offsets[1:] - offsets[:-1])[rows]
    per_k = min(int(rec_cfg["per_session_k"]), len(services))
    valid_t = torch.as_tensor(recommendable(services), device=device)
    used_t = torch.as_tensor(used, device=device) if rec_cfg.get("filter_used") == "before_topk" else None
    # results stay on the device until the end: one copy back, not one sync per batch
    top_idx = torch.zeros((S, per_k), dtype=torch.long, device=device)
    top_val = torch.zeros((S, per_k), device=device)
    top_p = torch.zeros((S, per_k), device=device)
    n_pg = min(top_pages, len(pages)) if pages is not None else 0
    pg_idx = torch.zeros((n_users, n_pg), dtype=torch.long, device=device)
    pg_p = torch.zeros((n_users, n_pg), device=device)
    emb_sum = None
    page_valid = torch.as_tensor(recommendable(pages), device=device) if pages is not None else None
    user_t = torch.from_numpy(sess_user).to(device)
    rec_t = torch.from_numpy(rec_rows).to(device)
    latest_t = torch.from_numpy(latest).to(device)
    for b in length_batches(lengths, max_tokens):
        r = rows[b]
        r_t = torch.from_numpy(r).to(device, non_blocking=True)
        with _autocast(device):
            hidden, m = _encode(module.encoder, ids, offsets, r, pad_id, device, packed)  # (B, T, H), (B, T)
            page_logit, service_logit = module.heads(hidden, m)
        u_b = user_t[r_t]
        if same:
            e = mean_pool(hidden.float(), m)  # (B, H)
            if emb_sum is None:
                emb_sum = torch.zeros(n_users, e.shape[1], device=device)
            emb_sum.index_add_(0, u_b, e)
        # every row of the batch is scored (cheap next to the encoder); only the recommender's rows are kept
        p = service_logit.float().softmax(-1)  # (B, C)
        q = p.masked_fill(~valid_t, float("-inf"))
        if used_t is not None:
            q = q.masked_fill(used_t[u_b], float("-inf"))
        order = torch.sort(q, dim=1, descending=True, stable=True).indices[:, :per_k]
        keep = rec_t[r_t]
        top_idx[r_t[keep]] = order[keep]
        top_val[r_t[keep]] = q.gather(1, order)[keep]
        top_p[r_t[keep]] = p.gather(1, order)[keep]
        if n_pg:
            lk = latest_t[r_t]
            pp = page_logit[lk].float().softmax(-1)
            pp = torch.where(page_valid, pp, torch.full_like(pp, -1.0))
            o = torch.sort(pp, dim=1, descending=True, stable=True).indices[:, :n_pg]
            pg_idx[u_b[lk]] = o
            pg_p[u_b[lk]] = pp.gather(1, o)
    top_idx, top_val, top_p = top_idx.cpu().numpy(), top_val.cpu().numpy(), top_p.cpu().numpy()
    pg_idx, pg_p = pg_idx.cpu().numpy(), pg_p.cpu().numpy()
    rr = np.flatnonzero(rec_rows)
    svc, cnt, mass = rank_new_services(sess_user[rr], top_idx[rr], top_val[rr], top_p[rr], used, services,
                                       n_users, int(rec_cfg["k"]), rec_cfg["ranker"], rec_cfg["filter_used"])
    emb = None
    if same and emb_sum is None:  # no sessions at all
        emb = np.zeros((n_users, module.encoder.config.hidden_size), np.float32)
    elif same:
        emb = (emb_sum / torch.as_tensor(np.maximum(counts, 1), device=device, dtype=torch.float32)[:, None])
        emb = emb.cpu().numpy()
    elif embed:
        emb = embed_sessions(embed_module, ids, offsets, sess_user, n_users, device, max_tokens, pad_id, packed)
    return UserScores(counts, svc, cnt, mass, pg_idx if n_pg else None, pg_p if n_pg else None, emb)


@torch.no_grad()
def embed_sessions(module, ids: np.ndarray, offsets: np.ndarray, sess_user: np.ndarray, n_users: int, device,
                   max_tokens: int, pad_id: int, packed: bool | None = None) -> np.ndarray:
    """(U, H) float32: per user, the mean of its sessions' mean-pooled last-layer embeddings (`packed` as in
    `score_users`)."""
    device = torch.device(device)
    packed = use_packed(packed, device)
    module.eval()
    counts = np.bincount(sess_user, minlength=n_users)
    emb_sum = None
    for b in length_batches(offsets[1:] - offsets[:-1], max_tokens):
        with _autocast(device):
            hidden, m = _encode(module.encoder, ids, offsets, b, pad_id, device, packed)
        e = mean_pool(hidden.float(), m)
        if emb_sum is None:
            emb_sum = torch.zeros(n_users, e.shape[1], device=device)
        emb_sum.index_add_(0, torch.from_numpy(sess_user[b]).to(device), e)
    if emb_sum is None:
        return np.zeros((n_users, module.encoder.config.hidden_size), np.float32)
    return (emb_sum / torch.as_tensor(np.maximum(counts, 1), device=device, dtype=torch.float32)[:, None]).cpu().numpy()
