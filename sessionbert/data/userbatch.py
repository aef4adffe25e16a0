"""Users' event logs -> what `sessionbert.score` consumes: token ids of each user's sessions before a cut-off and
the services each user used before it. CPU only (no torch import), so it runs in worker processes.

Serialisation and tokenisation are the streaming prep's vectorised ones (`prep._serialise_chunk`,
`prep._encode_chunk`), whose ids equal the pipeline's `Corpus.build` + `SessionEncoder.build` (tests/test_prep.py;
tests/test_inference.py scores the pipeline's users through this path and gets the pipeline's Hit@5).

Large Parquet inputs are cut into *splits* of whole row groups that workers read themselves (`plan_splits`,
`read_split`): a split owns the users whose first row lies in it, skips the rows of a user that began in the
previous split and reads on into the next row groups until its last user ends, so no user is cut in two and the
main process never touches the events. The file must hold each user's rows together (grouped, e.g. sorted by
user_id); a user found in two places is an error naming the file and row.

CSV / JSONL inputs (and folders) cannot be split by position: the main process streams them in tables of whole
users (`io.stream_events`, which reads, validates and carries a user straddling a block into the next table) and
`prepare_frame` serialises and tokenises each table, in a worker or in-process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import prep
from .prep import _np, _ranks
from .io import BadInputError, changes, reappears_message, validate_rows
from .schema import BILLING_SCHEMA, EVENT_SCHEMA
from .split import TimeSplit

_FAR = pd.Timestamp("2262-01-01", tz="UTC")  # "no cut-off": after every representable event time


@dataclass
class Context:
    """What a worker needs to prepare users (picklable: the tokenizer travels as its folder)."""

    tokenizer_dir: str
    seq_len: int
    services: list[str]  # the service head's classes
    cutoff: pd.Timestamp | None  # UTC; None = every session
    special: tuple[int, int, int]  # ids of the event separator, [CLS], [SEP] (SessionEncoder's)
    use_region: bool = True
    use_billing: bool = True  # the run was trained with billing metadata: users without bills get "tier none"
    billing_path: str | None = None  # a Parquet billing file the workers read themselves (row-group statistics)


@dataclass
class Prepared:
    """One batch of users, in user order (as in the input, sorted by user_id within the batch)."""

    users: np.ndarray  # (U,) object user ids
    first_line: np.ndarray  # (U,) 1-based input row of each user's first event (0 when unknown)
    n_sessions: np.ndarray  # (U,) sessions before the cut-off
    ids: np.ndarray  # (N,) int32 token ids of those sessions, concatenated
    offsets: np.ndarray  # (S + 1,) int64
    sess_user: np.ndarray  # (S,) int64 index into users, non-decreasing; sessions oldest first
    used: np.ndarray  # (U, C) bool: service class used before the cut-off


# ---------------------------------------------------------------------------------------------- one batch
_TOK: dict[str, object] = {}


class _Backend:
    """prep._Ids reads `.backend_tokenizer`: the Rust tokenizer of the run's tokenizer.json, loaded without
    transformers (workers start faster)."""

    def __init__(self, tokenizer_dir: str):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))


def _ids_for(ctx: "Context"):
    if ctx.tokenizer_dir not in _TOK:
        _TOK[ctx.tokenizer_dir] = prep._Ids(_Backend(ctx.tokenizer_dir))
    return _TOK[ctx.tokenizer_dir]


def _sorted_by_user(t: pa.Table) -> pa.Table:
    u = t.column("user_id")
    if t.num_rows > 1 and _np(pc.less(u.slice(1), u.slice(0, t.num_rows - 1))).any():
        return t.take(pc.sort_indices(t, sort_keys=[("user_id", "ascending")]))  # stable
    return t


def prepare(events: pa.Table, billing: pa.Table | None, ctx: Context, lines: np.ndarray | None = None) -> Prepared:
    """Serialise, tokenise and index one batch of whole users (`events`: event-schema columns, any row order
    with each user's rows anywhere in the batch; `billing`: those users' bills or None; `lines`: the events'
    1-based input rows, for messages)."""
    if lines is not None:
        events = events.append_column("_line", pa.array(np.asarray(lines, np.int64)))
    events = _sorted_by_user(events)
    cut = ctx.cutoff if ctx.cutoff is not None else _FAR
    split = TimeSplit(start=cut, val_start=cut, test_start=cut, end=cut)  # windows: 0 = before the cut-off, 2 after
    if ctx.use_billing:
        billing = billing if billing is not None else pa.table(
            {c: pa.array([], BILLING_SCHEMA.field(c).type) for c in BILLING_SCHEMA.names})
    else:
        billing = None
    ids_of = _ids_for(ctx)
    evt_id, cls_id, end_id = ctx.special
    if events.num_rows == 0:
        z = np.zeros(0, np.int64)
        return Prepared(np.zeros(0, object), z, z, np.zeros(0, np.int32), np.zeros(1, np.int64), z,
                        np.zeros((0, len(ctx.services)), bool))
    ch = prep._serialise_chunk(events.select([c for c in events.column_names if c != "_line"]), billing, split,
                               ctx.use_region, Path("events"), 0, None)
    enc = prep._encode_chunk(ch, ids_of, evt_id, cls_id, end_id, ctx.seq_len)
    users_all = pc.unique(events.column("user_id"))  # sorted input: user order
    users = _np(users_all).astype(object)
    U = len(users)
    s_user = _np(pc.index_in(enc.column("user_id"), value_set=users_all)).astype(np.int64)
    hist = _np(enc.column("window")) != 2
    ids_col = enc.column("input_ids").combine_chunks()
    all_off = _np(ids_col.offsets).astype(np.int64)
    flat = _np(ids_col.values).astype(np.int32)
    keep = np.flatnonzero(hist)
    lens = all_off[keep + 1] - all_off[keep]
    offsets = np.zeros(len(keep) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    ids = flat[np.repeat(all_off[keep], lens) + _ranks(lens)]
    sess_user = s_user[keep]
    # services used before the cut-off (event time, as split.used_and_adopted)
    ts = _np(events.column("timestamp").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()))
    before = ts < -(-cut.value // 1_000_000)
    e_user = _np(pc.index_in(events.column("user_id"), value_set=users_all)).astype(np.int64)
    codes, names = prep._codes(events.column("service"))
    lab = pd.Index(ctx.services).get_indexer(names) if len(names) else np.zeros(0, np.int64)
    e_lab = np.where(codes >= 0, lab[np.maximum(codes, 0)] if len(lab) else -1, -1)
    used = np.zeros((U, len(ctx.services)), bool)
    m = before & (e_lab >= 0)
    used[e_user[m], e_lab[m]] = True
    first_line = np.zeros(U, np.int64)
    if "_line" in events.column_names:
        new = changes(events.column("user_id"))
        first_line[e_user[new]] = _np(events.column("_line"))[new]
    return Prepared(users, first_line, np.bincount(sess_user, minlength=U), ids, offsets, sess_user, used)


# ---------------------------------------------------------------------------------------------- splits of a file
def plan_splits(path: str | os.PathLike, target_rows: int) -> list[tuple[int, int]]:
    """Row-group ranges [a, b) of about `target_rows` rows each (at least one row group)."""
    md = pq.ParquetFile(path).metadata
    out, a, rows = [], 0, 0
    for g in range(md.num_row_groups):
        rows += md.row_group(g).num_rows
        if rows >= target_rows:
            out.append((a, g + 1))
            a, rows = g + 1, 0
    if a < md.num_row_groups:
        out.append((a, md.num_row_groups))
    return out


def read_split(path: str | os.PathLike, a: int, b: int) -> tuple[pa.Table, np.ndarray]:
    """The rows of the users whose first row lies in row groups [a, b), and their 1-based row numbers."""
    pf = pq.ParquetFile(path, pre_buffer=False)
    md = pf.metadata
    cols = [c for c in pf.schema_arrow.names if c in EVENT_SCHEMA.names]
    row0 = sum(md.row_group(g).num_rows for g in range(a))
    t = pf.read_row_groups(list(range(a, b)), columns=cols)
    skip = 0
    if a > 0 and t.num_rows:
        prev = pf.read_row_group(a - 1, columns=["user_id"]).column(0)
        skip = _lead(t.column("user_id"), prev[len(prev) - 1].as_py())
    parts = [t.slice(skip)]
    if t.num_rows > skip:
        last = t.column("user_id")[t.num_rows - 1].as_py()
        for g in range(b, md.num_row_groups):
            nxt = pf.read_row_group(g, columns=["user_id"]).column(0)
            n = _lead(nxt, last)
            if n:
                parts.append(pf.read_row_group(g, columns=cols).slice(0, n))
            if n < len(nxt):
                break
    out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return out, np.arange(row0 + skip + 1, row0 + skip + 1 + out.num_rows, dtype=np.int64)


def _lead(col: pa.ChunkedArray, user) -> int:
    """How many leading rows of `col` equal `user`."""
    if len(col) == 0:
        return 0
    eq = _np(pc.equal(col, user))
    return len(eq) if eq.all() else int(np.argmin(eq))


def billing_for(path: str | os.PathLike, users: pa.Array) -> pa.Table:
    """The validated billing rows of `users` from a Parquet billing file, reading only the row groups whose
    user_id statistics overlap them (all row groups when the file has no statistics)."""
    pf = pq.ParquetFile(path, pre_buffer=False)
    md = pf.metadata
    names = pf.schema_arrow.names
    lo, hi = pc.min_max(users).values()
    lo, hi = lo.as_py(), hi.as_py()
    col = names.index("user_id") if "user_id" in names else -1
    groups, row0s, r = [], [], 0
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics if col >= 0 else None
        if st is None or not st.has_min_max or not (st.max < lo or st.min > hi):
            groups.append(g)
            row0s.append(r)
        r += md.row_group(g).num_rows
    parts, lines = [], []
    for g, r0 in zip(groups, row0s):
        t = pf.read_row_group(g, columns=[c for c in names if c in BILLING_SCHEMA.names])
        keep = _np(pc.is_in(t.column("user_id"), value_set=users)) if "user_id" in t.column_names else \
            np.ones(t.num_rows, bool)
        idx = np.flatnonzero(keep)
        parts.append(t.take(pa.array(idx)))
        lines.append(r0 + idx + 1)
    if not parts:
        return pa.table({c: pa.array([], BILLING_SCHEMA.field(c).type) for c in BILLING_SCHEMA.names})
    t = pa.concat_tables(parts)
    df = validate_rows(t, path, np.concatenate(lines), "billing")
    return pa.Table.from_pandas(df.drop(columns="_line"), preserve_index=False)


def prepare_split(path: str, a: int, b: int, ctx: Context) -> Prepared:
    """Worker task: read, validate and prepare the users of row groups [a, b) of `path`."""
    t, lines = read_split(path, a, b)
    new = changes(t.column("user_id"))
    if int(new.sum()) != pc.count_distinct(t.column("user_id")).as_py():  # a user in two runs of rows
        codes = pd.factorize(_np(t.column("user_id")))[0]
        seen_run = np.zeros(codes.max() + 1, bool)
        for i in np.flatnonzero(new):
            if seen_run[codes[i]]:
                raise BadInputError(reappears_message(Path(path), t.column("user_id")[int(i)].as_py(), int(lines[i])))
            seen_run[codes[i]] = True
    df = validate_rows(t, path, lines, "events")
    ev = pa.Table.from_pandas(df.drop(columns="_line"), preserve_index=False)
    bill = None
    if ctx.use_billing and ctx.billing_path and ev.num_rows:
        bill = billing_for(ctx.billing_path, pc.unique(ev.column("user_id")))
    return prepare(ev, bill, ctx, df["_line"].to_numpy())


def prepare_frame(events: pd.DataFrame, ctx: Context, billing: pa.Table | None = None) -> Prepared:
    """Worker task for a streamed CSV / JSONL input (or a folder): prepare one table of `io.stream_events` (whole
    users, validated, with their ``_line``). `billing`: those users' bills, or None to read them from the Parquet
    ``ctx.billing_path`` (row-group statistics) as `prepare_split` does."""
    ev = pa.Table.from_pandas(events[EVENT_SCHEMA.names], preserve_index=False)
    if billing is None and ctx.use_billing and ctx.billing_path and ev.num_rows:
        billing = billing_for(ctx.billing_path, pc.unique(ev.column("user_id")))
    lines = events["_line"].to_numpy() if "_line" in events else None
    return prepare(ev, billing, ctx, lines)


class BillsByUser:
    """A billing table read whole (a CSV / JSONL billing file), sorted by user so that the bills of a table of
    users are a few binary searches away."""

    def __init__(self, billing: pd.DataFrame):
        b = billing[[c for c in BILLING_SCHEMA.names if c in billing]]
        self.bills = b.sort_values("user_id", kind="stable").reset_index(drop=True)
        self.users = self.bills["user_id"].to_numpy(dtype=object)

    def of(self, users: np.ndarray | pd.Series) -> pa.Table:
        """The bills of `users` (ids), as an Arrow table."""
        u = pd.unique(np.asarray(users, dtype=object))
        lo = np.searchsorted(self.users, u, side="left")
        hi = np.searchsorted(self.users, u, side="right")
        lens = (hi - lo).astype(np.int64)
        idx = np.sort(np.repeat(lo, lens) + _ranks(lens))
        return pa.Table.from_pandas(self.bills.iloc[idx], preserve_index=False)


def init_worker() -> None:
    """Process-pool initializer: one thread per worker (the pool is the parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
