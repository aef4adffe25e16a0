"""The events of a run turned into what the models consume: sessions per time window, their text, and
fine-tuning examples (session prefix -> next page, next service)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .serialize import Encoded, SessionEncoder, event_texts, session_metadata
from .split import TimeSplit, session_table, time_split


@dataclass
class Corpus:
    events: pd.DataFrame  # sorted by user_id, session_id order of first event, timestamp
    sessions: pd.DataFrame  # one row per session, in event order: session_id, user_id, start, n_events, window
    bounds: np.ndarray  # (n_sessions + 1,) event offsets
    split: TimeSplit
    meta: list[str]
    texts: pd.Series
    _encoded: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, events: pd.DataFrame, billing: pd.DataFrame | None, val_days: float, test_days: float,
              use_region: bool = True, use_billing: bool = True, period: tuple | None = None) -> "Corpus":
        """Serialise `events`; windows from (val_days, test_days) before the end. `period` (first, last timestamp):
        the whole data's span when `events` are a sample of its users, so the windows are the whole data's."""
        ev = events.copy()
        ev["timestamp"] = pd.to_datetime(ev["timestamp"], utc=True)
        split = time_split(pd.Series(list(period)) if period is not None else ev["timestamp"], val_days, test_days)
        # sessions contiguous, ordered by user then session start; events inside a session by time
        start = ev.groupby("session_id")["timestamp"].transform("min")
        if not in_session_order(ev["user_id"], start, ev["session_id"], ev["timestamp"]):
            ev = ev.assign(_start=start).sort_values(["user_id", "_start", "session_id", "timestamp"], kind="stable")
            ev = ev.drop(columns="_start")
        ev = ev.reset_index(drop=True)
        sessions = session_table(ev, split)
        order = pd.Index(ev["session_id"]).unique()
        sessions = sessions.set_index("session_id").loc[order].reset_index()
        bounds = np.concatenate([[0], np.cumsum(sessions["n_events"].to_numpy())])
        first = ev.iloc[bounds[:-1]]
        sessions["region"] = first["region"].to_numpy() if "region" in ev else None
        meta = session_metadata(sessions, billing, use_region, use_billing).tolist()
        return cls(ev, sessions, bounds, split, meta, event_texts(ev))

    def encode(self, encoder: SessionEncoder) -> Encoded:
        from .serialize import tokenizer_key

        key = tokenizer_key(encoder.tok)  # by content: the stages each load the run's tokenizer, encoded once
        if key not in self._encoded:
            self._encoded[key] = encoder.encode(self.meta, self.texts, self.bounds)
        return self._encoded[key]

    def event_window(self) -> np.ndarray:
        """(n_events,) the window of each event's session."""
        return np.repeat(self.sessions["window"].to_numpy(), self.sessions["n_events"].to_numpy())

    def window_sessions(self, window: str) -> np.ndarray:
        return np.flatnonzero(self.sessions["window"].to_numpy() == window)

    def train_texts(self, max_sessions: int | None = None, seed: int = 0):
        """Serialised text of each training-window session (for the tokenizer); with `max_sessions`, of a seeded
        random sample of that many (in corpus order) when there are more."""
        sess = self.window_sessions("train")
        if max_sessions is not None and len(sess) > max_sessions:
            sess = np.sort(np.random.default_rng(seed).choice(sess, int(max_sessions), replace=False))
        for s in sess:
            lo, hi = self.bounds[s], self.bounds[s + 1]
            yield self.meta[s] + " [EVT] " + " [EVT] ".join(self.texts.iloc[lo:hi])

    def prefix_examples(self, window: str, labels: "LabelMaps", max_per_session: int | None,
                        seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, page_y, service_y): prefixes of 1..n-1 events of each session in `window`, target = event n.

        With `max_per_session` a deterministic random subset of each session's prefixes is kept, so long
        sessions do not dominate and CPU budgets hold.
        """
        rng = np.random.default_rng(seed)
        sess = self.window_sessions(window)
        n = self.sessions["n_events"].to_numpy()[sess]
        counts = np.maximum(n - 1, 0)
        s_rep = np.repeat(sess, counts)  # (P,)
        # prefix lengths 1..n-1 for each session
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        plen = np.arange(len(s_rep)) - starts + 1
        if max_per_session is not None and len(s_rep):
            key = rng.random(len(s_rep))
            order = np.lexsort((key, s_rep))
            rank = np.empty(len(s_rep), dtype=np.int64)
            rank[order] = np.arange(len(s_rep)) - np.repeat(np.cumsum(counts) - counts, counts)
            keep = rank < max_per_session
            s_rep, plen = s_rep[keep], plen[keep]
        target_row = self.bounds[s_rep] + plen  # the event right after the prefix
        # only the target rows converted to numpy (not the whole column of every event, per window and column)
        page_y = labels.page_index(self.events["page"].take(target_row).to_numpy())
        service_y = labels.service_index(self.events["service"].take(target_row).to_numpy())
        return np.stack([s_rep, plen], axis=1), page_y, service_y


def in_session_order(user: pd.Series, start: pd.Series, session: pd.Series, timestamp: pd.Series) -> bool:
    """Whether the rows are already ordered by (user_id, session start, session_id, timestamp), as the simulator and
    sorted logs write them: `Corpus.build` then skips its sort (12.2 -> 7.7 s for 540k sessions on 2 cores,
    experiments/results/bench_encode_cpu.txt). Checked on integer keys (ids factorised in sorted order, times as
    int64) in one vectorised pass; a missing id or time answers False (the sort decides). The streaming prep has its
    own check per chunk of whole users (`prep._in_corpus_order`), from the row flags it already computes."""
    if len(user) < 2:
        return True
    keys = []
    for col, is_id in ((user, True), (start, False), (session, True), (timestamp, False)):
        if col.isna().any():
            return False
        keys.append(pd.factorize(col, sort=True)[0] if is_id else col.astype("int64").to_numpy())
    undecided = np.ones(len(user) - 1, bool)  # consecutive pairs equal on every key so far
    for k in keys:
        d = np.diff(k)
        if (undecided & (d < 0)).any():
            return False
        undecided &= d == 0
    return True


@dataclass
class LabelMaps:
    """Class indices of pages and services seen in training. Index 0 is "[OTHER]": an unseen target is a miss."""

    pages: list[str]
    services: list[str]

    @classmethod
    def from_corpus(cls, corpus: Corpus) -> "LabelMaps":
        tr = corpus.events[corpus.event_window() == "train"]
        return cls(["[OTHER]"] + sorted(tr["page"].unique()), ["[OTHER]"] + sorted(tr["service"].unique()))

    def page_index(self, pages: np.ndarray) -> np.ndarray:
        return pd.Index(self.pages).get_indexer(pages).clip(min=0)

    def service_index(self, services: np.ndarray) -> np.ndarray:
        return pd.Index(self.services).get_indexer(services).clip(min=0)

    def to_dict(self) -> dict:
        return {"pages": self.pages, "services": self.services}
