"""Streaming CPU prep: events Parquet -> serialised sessions -> WordPiece ids -> token-id shards on disk.

    python -m sessionbert.data.prep EVENTS.parquet OUT_DIR [--billing BILLING.parquet] [--seq-len 128] [--workers N]

The events file is read in record batches (pyarrow) and cut at user boundaries, so memory is bounded by one
batch of events plus one shard of output, never by the dataset. Per batch everything is vectorised: event
texts are built once per distinct (service, page, title, action) and tokenised once per distinct text
(tokenizers' Rust `encode_batch`), metadata once per distinct metadata text, and sessions are assembled
with numpy gathers (no Python loop over events or sessions). Billing is merge-joined in the same pass.

The ids are exactly those of the in-memory path (`Corpus.build` + `SessionEncoder.build`, tested): the same
event text, previous-month billing metadata, time split and truncation (metadata first, then the most
recent events that fit `seq_len`, cut at event boundaries).

Input contract (checked, with the row named when violated): events sorted by user_id (what `simulate_to_dir`
and `read_events` write), billing, when given, too. Within a batch (whole users) rows are put in Corpus.build's
order (session start, session_id, timestamp) when they are not already. The time split needs the period's end
first: it comes from the Parquet row-group statistics of `timestamp` (a streaming pass over that one column
when a file has none).

`workers` > 0 (`--workers N`): after the tokenizer's sample, the chunks are serialised and encoded in N spawned
processes and added to the shards in order; the output is that of the serial run. Spawned processes import the
caller's main module, so a script calling prep_shards(workers=...) needs the `if __name__ == "__main__":` guard.

Output (`out_dir`, written under a temporary name and renamed when complete):
  shard-00000.parquet ...  `shard_sessions` sessions each (the last one fewer), SHARD_SCHEMA: session_id,
                           user_id, start, window (index into WINDOWS), n_events, input_ids (list<int32>,
                           [CLS] ... [SEP], at most seq_len ids; untruncated when seq_len is None)
  tokenizer/               the WordPiece tokenizer (HF format), trained on the first `tokenizer_sample`
                           training-window sessions unless one was given
  manifest.json            counts, shards, split, tokenizer note, settings
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .io import changes as _changes, parquet_user_tables
from .serialize import EVENT_SEP, backend_of
from .split import TimeSplit, time_split

WINDOWS = ("train", "val", "test")
FORMAT = "sessionbert-token-shards-v1"
SHARD_SCHEMA = pa.schema(
    [
        ("session_id", pa.string()),
        ("user_id", pa.string()),
        ("start", pa.timestamp("ms", tz="UTC")),
        ("window", pa.int8()),  # index into WINDOWS
        ("n_events", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
    ]
)
_EVENT_COLUMNS = ("user_id", "session_id", "timestamp", "service", "page", "page_title", "action", "region")
_DICT_COLUMNS = ("service", "page", "page_title", "action", "region")  # few distinct values: read as codes
_BILLING_COLUMNS = ("user_id", "month", "service", "spend_usd")
_TIER_BOUNDS = np.array([10.0, 100.0, 1000.0])  # serialize.spend_tier's bounds, vectorised
_MS = np.int64(1_000_000)  # ns per ms


class PrepInputError(ValueError):
    """The input breaks the streaming contract; the message names the file and row."""


# ---------------------------------------------------------------------------------------------- helpers
def _ranks(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 within each of consecutive runs of the given lengths: [2, 3] -> [0, 1, 0, 1, 2]."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def _np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _period_end(ef: pq.ParquetFile, path: Path, batch_rows: int) -> tuple[pd.Timestamp, pd.Timestamp]:
    """(min, max) timestamp from row-group statistics, or from a streaming pass over the column."""
    col = ef.schema_arrow.get_field_index("timestamp")
    lo = hi = None
    md = ef.metadata
    pcol = ef.schema.names.index("timestamp") if "timestamp" in ef.schema.names else -1
    if col < 0 or pcol < 0:
        raise PrepInputError(f"{path}: no 'timestamp' column")
    stats_ok = md.num_row_groups > 0
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(pcol).statistics
        if st is None or not st.has_min_max:
            stats_ok = False
            break
        a, b = pd.Timestamp(st.min), pd.Timestamp(st.max)
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    if not stats_ok:
        lo = hi = None
        for rb in ef.iter_batches(batch_size=batch_rows, columns=["timestamp"]):
            mm = pc.min_max(rb.column(0))
            a, b = mm["min"].as_py(), mm["max"].as_py()
            if a is None:
                continue
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    if lo is None:
        raise PrepInputError(f"{path}: no events")
    lo, hi = pd.Timestamp(lo), pd.Timestamp(hi)
    return (lo.tz_localize("UTC") if lo.tzinfo is None else lo), (hi.tz_localize("UTC") if hi.tzinfo is None else hi)


# ---------------------------------------------------------------------------------------------- reading
def _user_chunks(path: Path, columns: list[str], batch_rows: int) -> Iterator[tuple[int, pa.Table]]:
    """(first row index, table) of consecutive whole users (``io.parquet_user_tables``); columns with few
    distinct values are read as dictionary codes."""
    # pre_buffer=False: with it, the reader caches every column chunk it has read until it is closed, so memory
    # grew with the file (measured: +0.6 GB of Arrow buffers over 4M sessions); without it memory stays flat
    ef = pq.ParquetFile(path, read_dictionary=[c for c in _DICT_COLUMNS if c in columns], pre_buffer=False)
    return parquet_user_tables(ef, columns, batch_rows)


class _BillingCursor:
    """Merge join: the billing rows of users <= a given user id, from a file sorted by user_id."""

    def __init__(self, path: Path, batch_rows: int):
        self.path = path
        self.it = pq.ParquetFile(path, read_dictionary=["month", "service"], pre_buffer=False).iter_batches(
            batch_size=batch_rows, columns=list(_BILLING_COLUMNS))
        self.buf: pa.Table | None = None
        self.done = False
        self.row0 = 0  # file row of buf's first row
        self.last_user: str | None = None

    def _pull(self) -> bool:
        try:
            rb = next(self.it)
        except StopIteration:
            self.done = True
            return False
        t = pa.Table.from_batches([rb])
        u = t.column("user_id").combine_chunks()
        if len(u) > 1:
            bad = _np(pc.less(u.slice(1), u.slice(0, len(u) - 1)))
            if bad.any():
                i = int(np.argmax(bad)) + 1
                raise PrepInputError(f"{self.path}: billing must be sorted by user_id for streaming prep "
                                     f"(row {self.row0 + (self.buf.num_rows if self.buf else 0) + i + 1})")
        if len(u) and self.last_user is not None and u[0].as_py() < self.last_user:
            raise PrepInputError(f"{self.path}: billing must be sorted by user_id for streaming prep "
                                 f"(row {self.row0 + (self.buf.num_rows if self.buf else 0) + 1})")
        if len(u):
            self.last_user = u[-1].as_py()
        self.buf = t if self.buf is None else pa.concat_tables([self.buf, t])
        return True

    def upto(self, user: str) -> pa.Table:
        """Billing rows with user_id <= user (all earlier rows were taken before)."""
        while not self.done and (self.buf is None or self.last_user is None or self.last_user <= user):
            self._pull()
        if self.buf is None:
            return pa.table({c: pa.array([], pa.string()) for c in _BILLING_COLUMNS[:3]} |
                            {"spend_usd": pa.array([], pa.float64())})
        u = self.buf.column("user_id").combine_chunks()
        n = int(_np(pc.less_equal(u, user)).sum())  # sorted: a prefix
        out, self.buf = self.buf.slice(0, n), self.buf.slice(n)
        self.row0 += n
        return out


# ---------------------------------------------------------------------------------------------- one chunk
#: metadata is built from parts (ids of "a b" = ids of "a" + ids of "b": BERT pre-tokenisation splits at
#: whitespace and the normaliser works per character), so each part is tokenised once, not each session's text
_BILL_PREFIX = ["tier low billed", "tier mid billed", "tier high billed", "tier top billed", "tier none"]
_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")


@dataclass
class _Chunk:
    """One batch of whole users, serialised as codes into distinct texts; not tokenised yet."""

    session_id: pa.ChunkedArray  # (S,)
    user_id: pa.ChunkedArray  # (S,)
    start_ms: np.ndarray  # (S,) int64
    window: np.ndarray  # (S,) int8
    bounds: np.ndarray  # (S + 1,) event offsets
    ev_code: np.ndarray  # (E,) index into ev_texts
    ev_texts: np.ndarray  # (D,) object: distinct event texts of the chunk
    meta_parts: np.ndarray  # (S, K) index into part_texts, -1 = no part
    part_texts: np.ndarray  # (P,) object: metadata parts ("region eu-west-1", "tier mid billed", service names)

    def meta_text(self, s: int) -> str:
        return " ".join(self.part_texts[p] for p in self.meta_parts[s] if p >= 0)

    def train_texts(self, limit: int) -> list[str]:
        """Serialised text of up to `limit` training-window sessions (Corpus.train_texts' form)."""
        rows = np.flatnonzero(self.window == 0)[:limit]
        ev = self.ev_texts[self.ev_code]
        return [self.meta_text(s) + " [EVT] " + " [EVT] ".join(ev[self.bounds[s]:self.bounds[s + 1]]) for s in rows]


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int64 with -1 for null, dictionary object array) of a column, dictionary-typed or not."""
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    if col.num_chunks == 0:
        return np.zeros(0, np.int64), np.zeros(0, object)
    if col.num_chunks > 1:
        col = pa.chunked_array(pa.table({"c": col}).unify_dictionaries().column("c").chunks)
    codes = np.concatenate([_np(pc.fill_null(c.indices, -1)).astype(np.int64) for c in col.chunks])
    return codes, _np(col.chunk(0).dictionary).astype(object)


def _serialise_chunk(t: pa.Table, billing: pa.Table | None, split: TimeSplit, use_region: bool, path: Path,
                     row0: int, prev_user: str | None) -> _Chunk:
    n = t.num_rows
    u, sid, tcol = t.column("user_id"), t.column("session_id"), t.column("timestamp")
    if u.null_count or sid.null_count or tcol.null_count:
        raise PrepInputError(f"{path}: null user_id/session_id/timestamp near row {row0 + 1}")
    ts = _np(tcol.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()))
    # ---- contract checks (vectorised; rows reported 1-based as in sessionbert.data.io)
    if prev_user is not None and u[0].as_py() < prev_user:
        raise PrepInputError(f"{path}: events must be sorted by user_id (row {row0 + 1})")
    if n > 1:
        bad = _np(pc.less(u.slice(1), u.slice(0, n - 1)))
        if bad.any():
            raise PrepInputError(f"{path}: events must be sorted by user_id (row {row0 + int(np.argmax(bad)) + 2})")
    new_user = _changes(u)
    new_sess = _changes(sid) | new_user
    if not _in_corpus_order(sid, ts, new_user, new_sess):
        # the batch holds whole users, so Corpus.build's order (user, session start, session_id, timestamp;
        # stable) can be restored here: read_events, for one, sorts a user's sessions by id, not by start
        t = _sort_users(t, ts)
        u, sid = t.column("user_id"), t.column("session_id")
        ts = _np(t.column("timestamp").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()))
        new_user = _changes(u)
        new_sess = _changes(sid) | new_user
    starts = np.flatnonzero(new_sess)
    S = len(starts)
    start_ms = ts[starts]
    bounds = np.append(starts, n).astype(np.int64)
    take = pa.array(starts)
    s_user = pc.take(u, take)
    # ---- windows: TimeSplit.window_of on integer ms (t >= boundary <=> t_ms >= ceil(boundary in ms))
    val_ms = -(-split.val_start.value // _MS)
    test_ms = -(-split.test_start.value // _MS)
    window = np.where(start_ms >= test_ms, 2, np.where(start_ms >= val_ms, 1, 0)).astype(np.int8)
    # ---- event texts (serialize.event_texts) once per distinct (service, page, title, action)
    parts = [_codes(t.column(c)) if c in t.column_names else (np.full(n, -1, np.int64), np.zeros(0, object))
             for c in ("service", "page", "page_title", "action")]
    key = np.zeros(n, np.int64)
    for c, d in parts:  # mixed-radix key, re-factorised before it could overflow
        if (int(key.max()) + 1) * (len(d) + 1) >= 2**62:
            key = pd.factorize(key)[0].astype(np.int64)
        key = key * (len(d) + 1) + (c + 1)
    ev_code, uniq = pd.factorize(key)
    first = pd.Series(ev_code).drop_duplicates().index.to_numpy()  # the first row of each distinct key, in code order
    (svc_c, svc_d), (page_c, page_d), (title_c, title_d), (act_c, act_d) = parts
    texts = []
    for r in first:
        title = title_d[title_c[r]] if title_c[r] >= 0 else page_d[page_c[r]]
        text = f"{svc_d[svc_c[r]]} : {title}"
        if act_c[r] >= 0:
            text += f" . {act_d[act_c[r]]}"
        texts.append(text.lower())
    ev_texts = np.array(texts, dtype=object)
    # ---- metadata parts (serialize.session_metadata): region of the first event, previous month's billing
    part_texts: list[str] = []
    cols = []
    if use_region and "region" in t.column_names:
        rc, rd = _codes(pc.take(t.column("region"), take))
        part_texts += [f"region {r}".lower() for r in rd] + ["region unknown"]
        cols.append(np.where(rc >= 0, rc, len(rd)))  # null -> "unknown"
    if billing is not None:
        b0 = len(part_texts)
        bill = _billing_parts(billing, s_user, start_ms)  # (S, 4): prefix, top-3 services (codes, -1 = none)
        part_texts += _BILL_PREFIX + [str(x).lower() for x in bill[1]]
        codes = bill[0]
        cols.append(codes[:, 0] + b0)
        for j in (1, 2, 3):
            cols.append(np.where(codes[:, j] >= 0, codes[:, j] + b0 + len(_BILL_PREFIX), -1))
    meta_parts = np.stack(cols, 1) if cols else np.full((S, 1), -1, np.int64)
    return _Chunk(pc.take(sid, take), s_user, start_ms, window, bounds, ev_code.astype(np.int64),
                  ev_texts, meta_parts.astype(np.int64), np.array(part_texts, dtype=object))


def _in_corpus_order(sid: pa.ChunkedArray, ts: np.ndarray, new_user: np.ndarray, new_sess: np.ndarray) -> bool:
    """Rows of whole users already in Corpus.build's order: sessions contiguous, in start order (ties by
    session_id), events of a session in time order."""
    starts = np.flatnonzero(new_sess)
    if pc.count_distinct(sid).as_py() != len(starts):
        return False
    if ((np.diff(ts) < 0) & ~new_sess[1:]).any():
        return False
    d = np.diff(ts[starts])
    same_user = ~new_user[starts][1:]
    if ((d < 0) & same_user).any():
        return False
    tie = np.flatnonzero((d == 0) & same_user)  # equal starts: session_id decides
    if len(tie):
        s = pc.take(sid, pa.array(starts))
        if _np(pc.greater(pc.take(s, pa.array(tie)), pc.take(s, pa.array(tie + 1)))).any():
            return False
    return True


def _sort_users(t: pa.Table, ts: np.ndarray) -> pa.Table:
    """Whole users' rows in Corpus.build's order: user, session start, session_id, timestamp (stable)."""
    uc = pd.factorize(_np(t.column("user_id")), sort=True)[0]
    sc = pd.factorize(_np(t.column("session_id")), sort=True)[0]
    start = pd.Series(ts).groupby(sc).transform("min").to_numpy()
    return t.take(pa.array(np.lexsort((ts, sc, start, uc))))


def _months(strings: np.ndarray) -> np.ndarray:
    """'YYYY-MM' -> months since year 0 (-1 when not in that exact form: it would not match in the corpus)."""
    out = np.full(len(strings), -1, np.int64)
    for i, s in enumerate(strings):
        m = _MONTH_RE.match(str(s))
        if m and 1 <= int(m[2]) <= 12:
            out[i] = int(m[1]) * 12 + int(m[2]) - 1
    return out


def _billing_parts(billing: pa.Table, s_user: pa.ChunkedArray, start_ms: np.ndarray):
    """Per session: [prefix code into _BILL_PREFIX, top-3 service codes] from the billing of the month before the
    session starts (the month's bill is not known during it), and the service dictionary."""
    S = len(start_ms)
    out = np.full((S, 4), -1, np.int64)
    out[:, 0] = len(_BILL_PREFIX) - 1  # "tier none"
    if billing.num_rows == 0:
        return out, np.zeros(0, object)
    prev = start_ms.astype("datetime64[ms]").astype("datetime64[M]").astype(np.int64) + 1970 * 12 - 1  # (S,)
    users = pc.unique(s_user)
    s_uc = _np(pc.index_in(s_user, value_set=users)).astype(np.int64)
    b_uc = _np(pc.fill_null(pc.index_in(billing.column("user_id"), value_set=users), -1)).astype(np.int64)
    mc, md = _codes(billing.column("month"))
    b_month = np.where(mc >= 0, _months(md)[np.maximum(mc, 0)], -1)
    svc_c, svc_d = _codes(billing.column("service"))
    spend = np.nan_to_num(_np(billing.column("spend_usd")).astype(float))
    ok = (b_uc >= 0) & (b_month >= 0)
    b_uc, b_month, svc_c, spend = b_uc[ok], b_month[ok], svc_c[ok], spend[ok]
    # serialize.session_metadata's order: user, month, spend descending, service name (ties never by file order)
    name_rank = np.argsort(np.argsort(svc_d.astype(str), kind="stable"), kind="stable") if len(svc_d) else svc_d
    o = np.lexsort((name_rank[svc_c] if len(svc_d) else svc_c, -spend, b_month, b_uc))
    gk = b_uc[o] * 100_000 + b_month[o]  # (B,) group key, months < 100000
    new = np.ones(len(gk), bool)
    new[1:] = gk[1:] != gk[:-1]
    gid = np.cumsum(new) - 1
    G = int(gid[-1]) + 1 if len(gid) else 0
    rank = np.arange(len(gk)) - np.flatnonzero(new)[gid]
    tot = np.bincount(gid, weights=spend[o], minlength=G)
    top = np.full((G, 3), -1, np.int64)
    m = rank < 3
    top[gid[m], rank[m]] = svc_c[o][m]
    idx = pd.Index(gk[new]).get_indexer(s_uc * 100_000 + prev)
    hit = idx >= 0
    out[hit, 0] = np.searchsorted(_TIER_BOUNDS, tot[idx[hit]], side="right")
    out[hit, 1:] = top[idx[hit]]
    return out, svc_d


# ---------------------------------------------------------------------------------------------- tokenising
class _Ids:
    """Token ids of texts, tokenised once (Rust encode_batch) and cached; the cache is bounded."""

    def __init__(self, tokenizer, max_cache: int = 1_000_000):
        self.tok = backend_of(tokenizer)  # PreTrainedTokenizerFast or tokenizers.Tokenizer; truncation / padding off
        self.cache: dict[str, np.ndarray] = {}
        self.max_cache = max_cache

    def __call__(self, texts: np.ndarray) -> list[np.ndarray]:
        missing = [t for t in dict.fromkeys(texts.tolist()) if t not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.max_cache:
                self.cache.clear()
            for t, e in zip(missing, self.tok.encode_batch(missing, add_special_tokens=False)):
                self.cache[t] = np.asarray(e.ids, np.int32)
        return [self.cache[t] for t in texts.tolist()]


def _pool(pieces: list[np.ndarray], prefix: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate id lists (each optionally prefixed by one id): (pool, starts, lengths)."""
    lens = np.array([len(p) for p in pieces], np.int64)
    flat = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    if prefix is None:
        return flat, np.cumsum(lens) - lens, lens
    lens = lens + 1
    starts = np.cumsum(lens) - lens
    pool = np.empty(len(flat) + len(pieces), np.int32)
    rest = np.ones(len(pool), bool)
    rest[starts] = False
    pool[starts] = prefix
    pool[rest] = flat
    return pool, starts, lens


def assemble(
    meta_pool: np.ndarray, meta_start: np.ndarray, meta_len: np.ndarray,  # (S, K) parts of each session's metadata
    piece_pool: np.ndarray, piece_start: np.ndarray, piece_len: np.ndarray,  # (E,) [EVT] + the event's text ids
    bounds: np.ndarray, cls_id: int, end_id: int, seq_len: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] meta ([EVT] event)* [SEP] per session as (ids int32, offsets int64), SessionEncoder.build's
    truncation: metadata first (its start when it alone is too long), then the newest events that fit; when
    not even the newest fits, its last tokens. Vectorised: one gather over all output tokens."""
    S = len(bounds) - 1
    n_ev = np.diff(bounds)
    ev_sess = np.repeat(np.arange(S), n_ev)  # (E,)
    el = piece_len  # (E,)
    mlen = meta_len.sum(1)  # (S,)
    c = np.cumsum(el)
    end_c = np.zeros(S, np.int64)
    has = n_ev > 0
    end_c[has] = c[bounds[1:][has] - 1]
    suffix = end_c[ev_sess] - c + el  # (E,) tokens from this event to the session's end
    if seq_len is None:
        mkeep, keep, plen = mlen, np.ones(len(el), bool), np.zeros(S, np.int64)
    else:
        budget = seq_len - 2 - mlen
        mkeep = np.where(budget < 0, seq_len - 2, mlen)
        budget = np.maximum(budget, 0)
        keep = suffix <= budget[ev_sess]
        kept_n = np.bincount(ev_sess[keep], minlength=S)
        plen = np.where(has & (kept_n == 0) & (budget > 0), budget, 0)
    kept_tok = np.bincount(ev_sess[keep], weights=el[keep], minlength=S).astype(np.int64)
    L = 2 + mkeep + plen + kept_tok  # (S,)
    off = np.zeros(S + 1, np.int64)
    np.cumsum(L, out=off[1:])
    # one pool: [CLS], [SEP], metadata ids, event pieces
    pool = np.concatenate([np.array([cls_id, end_id], np.int32), meta_pool, piece_pool])
    m0, p0 = 2, 2 + len(meta_pool)
    # Segments (source start, length) laid out in output order, so that the copy is one gather:
    # per session [CLS], K metadata parts (cut to mkeep in total), the partial newest event, kept events, [SEP].
    K = meta_len.shape[1]
    part = (plen > 0).astype(np.int64)
    kept_n = np.bincount(ev_sess[keep], minlength=S)
    nseg = K + 2 + part + kept_n  # (S,)
    base = np.cumsum(nseg) - nseg  # (S,) first segment of each session
    n_all = int(nseg.sum())
    idx = np.int32 if int(off[-1]) < 2**31 and len(pool) < 2**31 else np.int64  # half the bytes in the big gather
    src = np.zeros(n_all, idx)
    ln = np.zeros(n_all, idx)
    ln[base] = 1  # [CLS] (source 0)
    mcum = np.cumsum(meta_len, 1) - meta_len  # (S, K) tokens before each part
    mslot = base[:, None] + 1 + np.arange(K)[None, :]  # (S, K)
    src[mslot] = meta_start + m0
    ln[mslot] = np.clip(mkeep[:, None] - mcum, 0, meta_len)
    ps = np.flatnonzero(plen)
    if len(ps):
        newest = bounds[1:][ps] - 1
        src[base[ps] + 1 + K] = piece_start[newest] + piece_len[newest] - plen[ps] + p0
        ln[base[ps] + 1 + K] = plen[ps]
    ke = np.flatnonzero(keep)
    ks = ev_sess[ke]
    rank = np.arange(len(ks)) - np.searchsorted(ks, ks)  # (kept,) order within the session (ks is sorted)
    eslot = base[ks] + 1 + K + part[ks] + rank
    src[eslot] = piece_start[ke] + p0
    ln[eslot] = el[ke]
    last = base + nseg - 1
    src[last], ln[last] = 1, 1  # [SEP]
    total = int(off[-1])
    seg0 = (np.cumsum(ln, dtype=np.int64) - ln).astype(idx)  # where each segment starts in the output
    out = pool[np.arange(total, dtype=idx) + np.repeat(src - seg0, ln)]
    return out, off


# ---------------------------------------------------------------------------------------------- the run
def _encode_chunk(ch: _Chunk, ids: _Ids, evt_id: int, cls_id: int, end_id: int, seq_len: int | None) -> pa.Table:
    mp, ms, ml = _pool(ids(ch.part_texts))
    mp_i = np.maximum(ch.meta_parts, 0)
    ml_s = np.where(ch.meta_parts >= 0, ml[mp_i] if len(ml) else 0, 0)  # (S, K), 0 for absent parts
    ms_s = ms[mp_i] if len(ms) else np.zeros_like(mp_i)
    pp, ps, pl = _pool(ids(ch.ev_texts), prefix=evt_id)
    flat, off = assemble(mp, ms_s, ml_s, pp, ps[ch.ev_code], pl[ch.ev_code], ch.bounds, cls_id, end_id, seq_len)
    input_ids = pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(flat))
    return pa.table(
        {
            "session_id": ch.session_id,
            "user_id": ch.user_id,
            "start": pa.array(ch.start_ms, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "window": pa.array(ch.window, pa.int8()),
            "n_events": pa.array(np.diff(ch.bounds).astype(np.int32)),
            "input_ids": input_ids,
        },
        schema=SHARD_SCHEMA,
    )


class _ShardWriter:
    """Writes exactly `size` sessions per shard (the last fewer), each file atomically (tmp + os.replace), on a
    background thread (Parquet encoding releases the GIL), at most one shard in flight (bounded memory)."""

    def __init__(self, out: Path, size: int, compression: str | None):
        self.out, self.size, self.compression = out, size, compression
        self.buf: list[pa.Table] = []
        self.n_buf = 0
        self.shards: list[dict] = []
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def add(self, t: pa.Table) -> None:
        self.buf.append(t)
        self.n_buf += t.num_rows
        while self.n_buf >= self.size:
            self._write(self.size)

    def close(self) -> None:
        if self.n_buf:
            self._write(self.n_buf)
        self._wait()
        self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _wait(self) -> None:
        if self.pending is not None:
            self.shards.append(self.pending.result())
            self.pending = None

    def _write(self, n: int) -> None:
        t = pa.concat_tables(self.buf)
        shard, rest = t.slice(0, n), t.slice(n)
        self.buf, self.n_buf = ([rest] if rest.num_rows else []), rest.num_rows
        name = f"shard-{len(self.shards) + (self.pending is not None):05d}.parquet"
        self._wait()
        self.pending = self.pool.submit(self._write_file, shard, name)

    def _write_file(self, shard: pa.Table, name: str) -> dict:
        tmp = self.out / (name + ".tmp")
        # dictionary encoding of the ids costs more write time than it saves after zstd
        pq.write_table(shard, tmp, compression=self.compression or "none", use_dictionary=["window"])
        os.replace(tmp, self.out / name)
        counts = np.bincount(_np(shard.column("window")), minlength=len(WINDOWS))
        return {"file": name, "sessions": shard.num_rows,
                "tokens": int(pc.sum(pc.list_value_length(shard.column("input_ids"))).as_py() or 0),
                "windows": {w: int(c) for w, c in zip(WINDOWS, counts)}}


def _prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Run `items` on a background thread, `depth` items ahead (Parquet decoding overlaps the numpy work)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put((x, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:  # re-raised in the consumer
            q.put((end, e))

    th = threading.Thread(target=work, daemon=True, name="prep-reader")
    th.start()
    try:
        while True:
            x, err = q.get()
            if x is end:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()


def prep_shards(
    events_path: str | Path,
    out_dir: str | Path,
    billing_path: str | Path | None = None,
    *,
    seq_len: int | None = 128,
    val_days: float = 14,
    test_days: float = 28,
    use_region: bool = True,
    use_billing: bool = True,
    tokenizer=None,
    vocab_size: int = 30000,
    min_frequency: int = 2,
    tokenizer_sample: int = 20_000,
    shard_sessions: int = 100_000,
    batch_rows: int = 1 << 20,
    compression: str | None = "zstd",
    overwrite: bool = False,
    workers: int = 0,
) -> dict:
    """Events (+ billing) Parquet -> token-id shards in `out_dir`; returns the manifest (with step times).

    `tokenizer`: a PreTrainedTokenizerFast, a tokenizer dir, or None to train WordPiece (vocab_size,
    min_frequency) on the first `tokenizer_sample` training-window sessions (a bounded sample: WordPiece
    training on the whole stream would cost as much as the rest of the prep).

    `workers` > 0: once the tokenizer is ready (given, or trained here on the first chunks, as in the serial run),
    the remaining chunks (whole users, with their billing rows) are serialised and encoded in a pool of that many
    spawned processes, at most 2 * workers chunks in flight; this process reads, merge-joins billing and adds
    the tables to the shards in chunk order. Shards, tokenizer and manifest are those of the serial run (timings
    aside), and so is the first input error raised.
    """
    from .tokenizer import load_tokenizer, train_wordpiece

    t_all = time.perf_counter()
    events_path, out = Path(events_path), Path(out_dir)
    if seq_len is not None and seq_len < 3:
        raise ValueError(f"prep: seq_len must be >= 3 or None, got {seq_len}")
    if shard_sessions < 1 or batch_rows < 1:
        raise ValueError("prep: shard_sessions and batch_rows must be >= 1")
    if workers < 0:
        raise ValueError(f"prep: workers must be >= 0, got {workers}")
    if not events_path.exists():
        raise FileNotFoundError(f"prep: events file {events_path} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"prep: {out} exists (overwrite=True replaces it)")
    ef = pq.ParquetFile(events_path)
    names = set(ef.schema_arrow.names)
    missing = [c for c in ("user_id", "session_id", "timestamp", "service", "page") if c not in names]
    if missing:
        raise PrepInputError(f"{events_path}: missing required columns {missing}")
    columns = [c for c in _EVENT_COLUMNS if c in names]
    lo, hi = _period_end(ef, events_path, batch_rows)
    split = time_split(pd.Series([lo, hi]), val_days, test_days)
    bill: _BillingCursor | None = None
    if use_billing and billing_path is not None:
        billing_path = Path(billing_path)
        if not billing_path.exists():
            raise FileNotFoundError(f"prep: billing file {billing_path} does not exist")
        bschema = pq.ParquetFile(billing_path).schema_arrow.names
        if [c for c in _BILLING_COLUMNS if c not in bschema]:
            raise PrepInputError(f"{billing_path}: billing needs columns {list(_BILLING_COLUMNS)}")
        # serialize.session_metadata adds billing only when the table has rows
        if pq.ParquetFile(billing_path).metadata.num_rows:
            bill = _BillingCursor(billing_path, batch_rows)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    times = dict(read_serialise=0.0, tokenizer_train=0.0, encode_assemble=0.0, write=0.0)
    writer = _ShardWriter(tmp, shard_sessions, compression)
    tok_note: dict = {"given": True}
    if tokenizer is not None and not hasattr(tokenizer, "backend_tokenizer"):
        tokenizer = load_tokenizer(tokenizer)
    ids = evt_id = cls_id = end_id = None
    pending: list[_Chunk] = []
    n_sample = 0
    n_events = 0
    pool: ProcessPoolExecutor | None = None
    inflight: deque[Future] = deque()  # chunks in the pool, in chunk order
    from_worker = False  # the exception being handled was raised collecting the pool's results (error order below)

    def ready(tk) -> None:
        nonlocal ids, evt_id, cls_id, end_id
        ids = _Ids(tk)
        vocab = tk.get_vocab()
        evt_id = vocab[EVENT_SEP] if EVENT_SEP in vocab else tk.sep_token_id  # as SessionEncoder does
        cls_id, end_id = tk.cls_token_id, tk.sep_token_id

    def flush(chunks: list[_Chunk]) -> None:
        for ch in chunks:
            t = time.perf_counter()
            table = _encode_chunk(ch, ids, evt_id, cls_id, end_id, seq_len)
            t2 = time.perf_counter()
            writer.add(table)
            times["encode_assemble"] += t2 - t
            times["write"] += time.perf_counter() - t2

    def collect(keep: int) -> None:
        """Add the pool's results to the shards, oldest first, until at most `keep` chunks are in flight."""
        nonlocal from_worker
        from_worker = True  # an error from here on is an older chunk's than those still in flight
        while len(inflight) > keep:
            t = time.perf_counter()
            table = inflight.popleft().result()
            t2 = time.perf_counter()
            writer.add(table)
            times["encode_assemble"] += t2 - t  # waiting for the workers
            times["write"] += time.perf_counter() - t2
        from_worker = False

    if tokenizer is not None:
        ready(tokenizer)
    try:
        prev_user = None
        t = time.perf_counter()
        for row0, tab in _prefetch(_user_chunks(events_path, columns, batch_rows)):
            last = tab.column("user_id")[-1].as_py()
            btab = bill.upto(last) if bill is not None else None
            if workers > 0 and ids is not None:
                if pool is None:
                    pool = _start_pool(workers, tokenizer, evt_id, cls_id, end_id, split, use_region, events_path,
                                       seq_len)
                inflight.append(pool.submit(_work_chunk, _ipc(tab), None if btab is None else _ipc(btab), row0,
                                            prev_user))
                prev_user = last
                n_events += tab.num_rows
                del tab, btab
                times["read_serialise"] += time.perf_counter() - t
                collect(2 * workers - 1)
                t = time.perf_counter()
                continue
            ch = _serialise_chunk(tab, btab, split, use_region, events_path, row0, prev_user)
            prev_user = last
            n_events += tab.num_rows
            del tab, btab
            times["read_serialise"] += time.perf_counter() - t
            if ids is None:  # still collecting the tokenizer's sample
                pending.append(ch)
                n_sample += int((ch.window == 0).sum())
                if n_sample >= tokenizer_sample:
                    tokenizer, tok_note = _train(pending, tokenizer_sample, vocab_size, min_frequency, times,
                                                 train_wordpiece)
                    ready(tokenizer)
                    flush(pending)
                    pending = []
            else:
                flush([ch])
            t = time.perf_counter()
        if ids is None:  # fewer training sessions than the sample size: train on all of them
            tokenizer, tok_note = _train(pending, tokenizer_sample, vocab_size, min_frequency, times, train_wordpiece)
            ready(tokenizer)
            flush(pending)
            pending = []
        collect(0)
        t = time.perf_counter()
        writer.close()
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        times["write"] += time.perf_counter() - t
    except BaseException as e:
        try:
            if isinstance(e, Exception) and not from_worker:
                # as in the serial run, an earlier chunk's error comes before this one (raised on reading a
                # later chunk or its billing): the chunks still in the pool are older than the one being read
                for f in inflight:
                    f.result()
        finally:
            for f in inflight:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                pool = None
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    n_sessions = sum(s["sessions"] for s in writer.shards)
    win = {w: sum(s["windows"][w] for s in writer.shards) for w in WINDOWS}
    manifest = {
        "format": FORMAT, "n_sessions": n_sessions, "n_events": n_events,
        "n_tokens": sum(s["tokens"] for s in writer.shards), "windows": win, "window_names": list(WINDOWS),
        "shards": writer.shards, "shard_sessions": shard_sessions, "seq_len": seq_len,
        "split": split.to_dict(), "tokenizer": "tokenizer", "tokenizer_note": tok_note,
        "settings": {"val_days": val_days, "test_days": test_days, "use_region": use_region,
                     "use_billing": bill is not None, "tokenizer_sample": tokenizer_sample, "batch_rows": batch_rows,
                     "compression": compression},
        "source": {"events": str(events_path), "billing": str(billing_path) if bill is not None else None},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    manifest["seconds"] = {k: round(v, 3) for k, v in times.items()} | {"total": round(time.perf_counter() - t_all, 3)}
    return manifest


# ---------------------------------------------------------------------------------------------- worker processes
_WORKER: dict = {}


def _start_pool(workers: int, tokenizer, evt_id: int, cls_id: int, end_id: int, split: TimeSplit, use_region: bool,
                path: Path, seq_len: int | None) -> ProcessPoolExecutor:
    """Spawned processes (the caller may hold CUDA: no fork), each loading the tokenizer once from its JSON."""
    import multiprocessing

    tok_json = tokenizer.backend_tokenizer.to_str()
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(tok_json, evt_id, cls_id, end_id, split, use_region, path, seq_len))


def _init_worker(tok_json: str, evt_id: int, cls_id: int, end_id: int, split: TimeSplit, use_region: bool,
                 path: Path, seq_len: int | None) -> None:
    # one process per core already: no Rust thread pool per worker as well (the ids do not depend on it)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER.update(ids=_Ids(Tokenizer.from_str(tok_json)), evt_id=evt_id, cls_id=cls_id, end_id=end_id,
                   split=split, use_region=use_region, path=path, seq_len=seq_len)


def _ipc(t: pa.Table) -> pa.Buffer:
    """A table as an Arrow IPC stream: chunks and dictionaries as they are, but only the sliced rows' bytes (a
    pickled slice carries its parent's whole buffers: up to 3x the bytes of a record batch read by _user_chunks)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue()


def _work_chunk(tab: pa.Buffer, btab: pa.Buffer | None, row0: int, prev_user: str | None) -> pa.Table:
    """One chunk of whole users (and their billing rows; both as IPC streams), serialised and encoded: the shard
    rows."""
    w = _WORKER
    tab = pa.ipc.open_stream(tab).read_all()
    btab = None if btab is None else pa.ipc.open_stream(btab).read_all()
    ch = _serialise_chunk(tab, btab, w["split"], w["use_region"], w["path"], row0, prev_user)
    return _encode_chunk(ch, w["ids"], w["evt_id"], w["cls_id"], w["end_id"], w["seq_len"])


def _train(pending: list[_Chunk], sample: int, vocab_size: int, min_frequency: int, times: dict, train_wordpiece):
    t = time.perf_counter()
    texts: list[str] = []
    for ch in pending:
        texts += ch.train_texts(sample - len(texts))
    if not texts:
        raise PrepInputError("prep: no training-window sessions to train the tokenizer on")
    tok, note = train_wordpiece(texts, vocab_size, min_frequency)
    times["tokenizer_train"] += time.perf_counter() - t
    return tok, note | {"sample_sessions": len(texts)}


# ---------------------------------------------------------------------------------------------- reading back
def read_manifest(shard_dir: str | Path) -> dict:
    p = Path(shard_dir) / "manifest.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: not a complete shard folder (no manifest.json)")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def iter_shards(shard_dir: str | Path, windows: tuple[str, ...] | None = None) -> Iterator[pa.Table]:
    """The shards as tables (one at a time), optionally only the sessions of the given windows."""
    d = Path(shard_dir)
    m = read_manifest(d)
    keep = None if windows is None else pa.array([WINDOWS.index(w) for w in windows], pa.int8())
    for s in m["shards"]:
        t = pq.read_table(d / s["file"])
        yield t if keep is None else t.filter(pc.is_in(t.column("window"), keep))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m sessionbert.data.prep")
    ap.add_argument("events", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--billing", type=Path, default=None)
    ap.add_argument("--seq-len", type=int, default=128, help="truncate to this many ids (0: keep whole sessions)")
    ap.add_argument("--vocab-size", type=int, default=30000)
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer dir instead of training one")
    ap.add_argument("--tokenizer-sample", type=int, default=20_000)
    ap.add_argument("--shard-sessions", type=int, default=100_000)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--workers", type=int, default=0,
                    help="serialise and encode in this many processes (0: in this one); the shards are the same")
    a = ap.parse_args(argv)
    m = prep_shards(a.events, a.out, a.billing, seq_len=a.seq_len or None, vocab_size=a.vocab_size,
                    tokenizer=a.tokenizer, tokenizer_sample=a.tokenizer_sample, shard_sessions=a.shard_sessions,
                    overwrite=a.overwrite, workers=a.workers)
    json.dump({k: m[k] for k in ("n_sessions", "n_events", "n_tokens", "windows", "seconds")}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
