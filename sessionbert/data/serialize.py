"""Sessions -> text -> token ids, in the patents' form.

A session is serialised as metadata and billing first, then one (service, page-text) identifier per event with
a separator token between consecutive events:

    [CLS] region eu-west tier mid billed compute-engine object-storage [EVT] compute engine : instances . launch [EVT] ... [SEP]

Each distinct event text is tokenised once (a console has a few thousand distinct (service, page, action)
texts, sessions have millions of events), then sessions are assembled from the cached id lists. Sessions
longer than `seq_len` keep their metadata and their most recent events (truncation at event boundaries).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

EVENT_SEP = "[EVT]"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", EVENT_SEP]

_TIERS = ((10.0, "low"), (100.0, "mid"), (1000.0, "high"))


def spend_tier(spend_usd: float) -> str:
    """Bucket a month's total spend (the console's own tiers are private; these are order-of-magnitude)."""
    for bound, name in _TIERS:
        if spend_usd < bound:
            return name
    return "top"


def event_texts(events: pd.DataFrame) -> pd.Series:
    """(service, page title, action) -> one identifier text per event. Built once per distinct combination (a
    console has thousands, a log has millions of events) and spread back by group code."""
    cols = [c for c in ("service", "page", "page_title", "action") if c in events]
    if not len(events):
        return _event_texts(events)
    codes = events.groupby(cols, sort=False, dropna=False, observed=True).ngroup().to_numpy()
    first = np.empty(int(codes.max()) + 1, np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # a row of each combination (its first)
    uniq = _event_texts(events.iloc[first])
    return pd.Series(uniq.to_numpy()[codes], index=events.index, name=uniq.name)


def _event_texts(events: pd.DataFrame) -> pd.Series:
    title = events["page_title"].fillna(events["page"]) if "page_title" in events else events["page"]
    text = events["service"].astype(str) + " : " + title.astype(str)
    if "action" in events:
        act = events["action"]
        text = text.where(act.isna(), text + " . " + act.astype(str))
    return text.str.lower()


def session_metadata(
    sessions: pd.DataFrame, billing: pd.DataFrame | None, use_region: bool = True, use_billing: bool = True,
    top_billed: int = 3,
) -> pd.Series:
    """Metadata text per session: region, and the previous month's spend tier and top billed services.

    `sessions` has session_id, user_id, start, region. Billing of the month *before* the session starts is used,
    because the current month's bill is not known while the session happens.
    """
    parts = pd.Series("", index=sessions.index, dtype=object)
    if use_region and "region" in sessions:
        parts = parts + sessions["region"].fillna("unknown").map(lambda r: f"region {r} ")
    if use_billing and billing is not None and len(billing):
        prev = (pd.to_datetime(sessions["start"], utc=True).dt.tz_localize(None).dt.to_period("M") - 1).astype(str)
        # spend ties by service name, so the text does not depend on the billing file's row order
        b = billing.sort_values(["user_id", "month", "spend_usd", "service"], ascending=[True, True, False, True])
        g = b.groupby(["user_id", "month"], sort=True)
        tot = g["spend_usd"].sum()
        # the top `top_billed` services of each (user, month), joined by spaces: one column per rank, no per-group
        # Python call (a lambda per group took 16 s for 560k groups)
        rank = g.cumcount().to_numpy()
        keep = rank < top_billed
        wide = b[keep].set_index(["user_id", "month", rank[keep]])["service"].unstack()  # (groups, ranks)
        top = wide[0].astype(str)
        for c in wide.columns[1:]:
            top = top.where(wide[c].isna(), top + " " + wide[c].astype(str))
        key = pd.MultiIndex.from_arrays([sessions["user_id"], prev])
        t = tot.reindex(key).to_numpy()
        names = top.reindex(key).to_numpy()
        bill = [
            "tier none " if not isinstance(n, str) else f"tier {spend_tier(float(x))} billed {n} "
            for x, n in zip(t, names)
        ]
        parts = parts + pd.Series(bill, index=sessions.index)
    return parts.str.strip().str.lower()


def backend_of(tokenizer):
    """The Rust `tokenizers.Tokenizer` of a fast tokenizer (or a `tokenizers.Tokenizer` itself) with truncation and
    padding off. A tokenizer.json may carry both: all-MiniLM-L6-v2's truncates and pads every text to 128 tokens.
    transformers' `__call__` switches them off per call, a direct `encode_batch` would apply them; so a tokenizer
    that has them is copied (the original is left as it is)."""
    b = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if b.truncation is None and b.padding is None:
        return b
    from tokenizers import Tokenizer

    b = Tokenizer.from_str(b.to_str())
    b.no_truncation()
    b.no_padding()
    return b


def tokenizer_key(tokenizer) -> str:
    """A content key of a tokenizer (two loads of the same files share it): its Rust tokenizer's JSON without the
    truncation / padding state."""
    import hashlib

    if not hasattr(tokenizer, "backend_tokenizer"):
        return f"id-{id(tokenizer)}"
    return hashlib.sha1(backend_of(tokenizer).to_str().encode()).hexdigest()


@dataclass
class Encoded:
    """Ragged token ids of sessions: session i is ids[offsets[i]:offsets[i+1]] (without [CLS]/[SEP])."""

    meta_ids: list[list[int]]  # per session
    event_ids: list[list[int]]  # per distinct event text
    event_codes: np.ndarray  # (n_events,) index into event_ids, events in session order
    session_bounds: np.ndarray  # (n_sessions + 1,) event offsets of each session


class SessionEncoder:
    """Turns serialised sessions into id sequences for one tokenizer (ours or a general-text BERT's)."""

    def __init__(self, tokenizer, seq_len: int, separator: str | None = None):
        self.tok = tokenizer
        self.seq_len = seq_len
        sep = separator or (EVENT_SEP if EVENT_SEP in tokenizer.get_vocab() else tokenizer.sep_token)
        self.sep_id = tokenizer.convert_tokens_to_ids(sep)
        self.cls_id = tokenizer.cls_token_id
        self.end_id = tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id
        self._backend = backend_of(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else None

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is None:  # a slow (Python) tokenizer
            return self.tok(texts, add_special_tokens=False)["input_ids"]
        # the Rust tokenizer directly: the same ids as transformers' __call__ (tested) without its per-text Python
        # conversion (a third of the time for 540k texts)
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, meta: list[str], event_text: pd.Series, session_bounds: np.ndarray) -> Encoded:
        """Each distinct event text and each distinct metadata text tokenised once (540k sessions of a 40k-user
        sample have 49k distinct metadata texts and 3.4k event texts); sessions share the id lists."""
        codes, uniques = pd.factorize(event_text, sort=False)
        m_codes, m_uniques = pd.factorize(pd.Series(meta, dtype=object), sort=False)
        m_ids = self._ids(list(m_uniques))
        return Encoded([m_ids[c] for c in m_codes.tolist()], self._ids(list(uniques)), codes.astype(np.int64),
                       session_bounds)

    def build(self, enc: Encoded, session: int, n_events: int | None = None) -> list[int]:
        """[CLS] meta ([EVT] event)* [SEP] for the first `n_events` events of `session` (all when None),
        dropping the oldest events until it fits `seq_len`."""
        lo, hi = enc.session_bounds[session], enc.session_bounds[session + 1]
        if n_events is not None:
            hi = lo + n_events
        meta = enc.meta_ids[session]
        budget = self.seq_len - 2 - len(meta)
        if budget < 0:  # metadata alone too long: keep its start
            meta, budget = meta[: self.seq_len - 2], 0
        body: list[int] = []
        for e in range(hi - 1, lo - 1, -1):  # newest first, so the most recent events survive truncation
            piece = [self.sep_id] + enc.event_ids[enc.event_codes[e]]
            if len(body) + len(piece) > budget:
                if not body:  # a single event longer than the budget: keep its end
                    body = piece[-budget:] if budget else []
                break
            body = piece + body
        return [self.cls_id] + meta + body + [self.end_id]

    def build_many(self, enc: Encoded, items: np.ndarray, chunk: int = 500_000) -> tuple[np.ndarray, np.ndarray]:
        """``build`` of every row (session s, n events; n < 0: all) of `items` (N, 2), vectorised: (ids (T,) int32,
        offsets (N + 1,) int64), row i = ids[offsets[i]:offsets[i + 1]] == build(enc, s_i, n_i). Each row is a run
        of segments ([CLS], the kept metadata, one [EVT]+event piece per kept event, [SEP]) gathered from one
        source array; `chunk` rows at a time bound the index arrays' memory."""
        from .prep import _ranks  # prep imports this module

        items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        meta_len = np.fromiter((len(m) for m in enc.meta_ids), np.int64, len(enc.meta_ids))
        moff = np.concatenate([[0], np.cumsum(meta_len)])
        mflat = np.fromiter((t for m in enc.meta_ids for t in m), np.int64, int(moff[-1]))
        plen = 1 + np.fromiter((len(e) for e in enc.event_ids), np.int64, len(enc.event_ids))  # [EVT] + ids
        poff = np.concatenate([[0], np.cumsum(plen)])
        pflat = np.empty(int(poff[-1]), np.int64)
        pflat[poff[:-1]] = self.sep_id
        body_pos = np.ones(int(poff[-1]), bool)
        body_pos[poff[:-1]] = False
        pflat[body_pos] = np.fromiter((t for e in enc.event_ids for t in e), np.int64, int(body_pos.sum()))
        src = np.concatenate([[self.cls_id, self.end_id], mflat, pflat]).astype(np.int32)
        base_m, base_p = 2, 2 + len(mflat)
        codes = np.asarray(enc.event_codes, dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(plen[codes])])  # (E + 1,) piece lengths summed in event order
        bounds = np.asarray(enc.session_bounds, dtype=np.int64)
        out_ids, out_len = [], []
        for c0 in range(0, len(items), chunk):
            s, n = items[c0:c0 + chunk, 0], items[c0:c0 + chunk, 1]
            lo = bounds[s]
            hi = np.where(n < 0, bounds[s + 1], lo + n)
            mk = np.minimum(meta_len[s], self.seq_len - 2)
            budget = np.maximum(self.seq_len - 2 - mk, 0)
            j = np.maximum(np.searchsorted(cum, cum[hi] - budget, side="left"), lo)  # as `lengths`
            trunc = (j == hi) & (hi > lo) & (budget > 0)  # newest event alone over budget: its last `budget` ids
            first = np.where(trunc, hi - 1, j)
            k = hi - first  # event segments per row
            nseg = 3 + k
            go = np.cumsum(nseg) - nseg  # first segment of each row
            g = int(nseg.sum())
            seg_start, seg_len = np.empty(g, np.int64), np.empty(g, np.int64)
            seg_start[go], seg_len[go] = 0, 1  # [CLS]
            seg_start[go + 1], seg_len[go + 1] = base_m + moff[s], mk  # metadata (its start when cut)
            seg_start[go + 2 + k], seg_len[go + 2 + k] = 1, 1  # [SEP]
            r = np.repeat(np.arange(len(s)), k)
            e = first[r] + _ranks(k)  # kept events, oldest first
            pos = go[r] + 2 + _ranks(k)
            c = codes[e]
            cut = trunc[r]
            seg_start[pos] = base_p + poff[c] + np.where(cut, plen[c] - budget[r], 0)
            seg_len[pos] = np.where(cut, budget[r], plen[c])
            out_ids.append(src[np.repeat(seg_start, seg_len) + _ranks(seg_len)])
            out_len.append(np.bincount(np.repeat(np.arange(len(s)), nseg), weights=seg_len, minlength=len(s))
                           .astype(np.int64))
        lens = np.concatenate(out_len) if out_len else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return (np.concatenate(out_ids) if out_ids else np.zeros(0, np.int32)), offsets

    def lengths(self, enc: Encoded, items: np.ndarray) -> np.ndarray:
        """(N,) ``len(self.build(enc, s, n))`` for each row (session s, n events; n < 0: all) of `items` (N, 2),
        vectorised: the events kept are the longest suffix of the prefix whose pieces ([EVT] + event ids) fit the
        budget left by the metadata, exactly as `build` drops the oldest events."""
        items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        if not len(items):
            return np.zeros(0, dtype=np.int64)
        s, n = items[:, 0], items[:, 1]
        bounds = np.asarray(enc.session_bounds, dtype=np.int64)
        lo = bounds[s]
        hi = np.where(n < 0, bounds[s + 1], lo + n)
        meta = np.fromiter((len(enc.meta_ids[i]) for i in s), dtype=np.int64, count=len(s))
        meta = np.minimum(meta, self.seq_len - 2)
        budget = np.maximum(self.seq_len - 2 - meta, 0)
        piece = 1 + np.fromiter((len(e) for e in enc.event_ids), dtype=np.int64, count=len(enc.event_ids))
        cum = np.concatenate([[0], np.cumsum(piece[np.asarray(enc.event_codes, dtype=np.int64)])])  # (E + 1,)
        # first event j >= lo with cum[hi] - cum[j] <= budget (pieces are >= 1 long, so cum is increasing)
        j = np.maximum(np.searchsorted(cum, cum[hi] - budget, side="left"), lo)
        body = cum[hi] - cum[j]
        body = np.where((j == hi) & (hi > lo), budget, body)  # a single event longer than the budget: its end
        return 2 + meta + body
