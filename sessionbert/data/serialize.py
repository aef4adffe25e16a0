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
    """(service, page title, action) -> one identifier text per event."""
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
        tot = b.groupby(["user_id", "month"])["spend_usd"].sum()
        top = b.groupby(["user_id", "month"])["service"].agg(lambda s: " ".join(list(s)[:top_billed]))
        key = pd.MultiIndex.from_arrays([sessions["user_id"], prev])
        t = tot.reindex(key).to_numpy()
        names = top.reindex(key).to_numpy()
        bill = [
            "tier none " if not isinstance(n, str) else f"tier {spend_tier(float(x))} billed {n} "
            for x, n in zip(t, names)
        ]
        parts = parts + pd.Series(bill, index=sessions.index)
    return parts.str.strip().str.lower()


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

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def encode(self, meta: list[str], event_text: pd.Series, session_bounds: np.ndarray) -> Encoded:
        codes, uniques = pd.factorize(event_text, sort=False)
        return Encoded(self._ids(list(meta)), self._ids(list(uniques)), codes.astype(np.int64), session_bounds)

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
