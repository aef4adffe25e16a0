"""Read users' own session logs (and billing tables) into the SessionBERT schema, validated, with clear errors.

Public entry points::

    events, report = read_events("logs/")            # a file or a directory of .parquet/.csv/.jsonl files
    billing, report = read_billing("billing.csv")
    write_parquet_atomic(events, "events.parquet", schema=EVENT_SCHEMA)
    for table in stream_events("logs.csv"): ...       # whole users at a time, same checks (`sessionbert recommend`)

How a read works, and why:

1. Fast path. Each file is parsed by pyarrow (``pyarrow.csv`` / ``pyarrow.json`` / ``pyarrow.parquet``) with
   string columns kept as strings (so ids such as ``"007"`` keep their zeros), then validated column by column
   with pandas/numpy. A clean file never goes through a Python loop over its rows.
2. Slow path. Only when pyarrow cannot parse a CSV/JSONL file, or validation finds a bad row in it, is that
   file read again line by line in Python. That pass knows each record's physical line (pyarrow does not), so
   every problem is reported as ``file:line: reason``; the excerpts of the bad lines are fetched afterwards.
3. Duplicate events are found across all files (the later copy, in sorted file order, is the bad one).
4. Bad rows either abort the read (``on_bad_rows="error"``, before anything is returned) or go to a rejects
   file (``on_bad_rows="skip"``), up to ``max_bad_fraction`` of the rows.

Locations: "line" is the 1-based physical line, the CSV header being line 1; a record that spans several lines
(a quoted newline) is reported at its first line. Parquet has no lines, so its rows are reported as
``file:row N`` with N 1-based.

Timestamps: an ISO 8601 string (no offset means UTC) or an epoch number. Numbers below 1e11 are epoch seconds,
others epoch milliseconds: within the accepted years 1990..2100 the two ranges cannot overlap. Numbers are
rounded to the millisecond, ISO strings truncated to it.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import gc
import gzip
import io as stdio
import itertools
import json
import logging
import os
import re
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from sessionbert.data.schema import BILLING_SCHEMA, EVENT_SCHEMA, REQUIRED

__all__ = [
    "BadInputError",
    "ReadReport",
    "SUPPORTED_FORMATS",
    "read_billing",
    "read_events",
    "write_parquet_atomic",
]

log = logging.getLogger("sessionbert.data")

OnBadRows = Literal["error", "skip"]

# suffix -> format. ".json" is read as JSON Lines (one object per line), like .jsonl/.ndjson.
_SUFFIX_FORMAT = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
SUPPORTED_FORMATS = (".parquet, .pq, .csv, .jsonl, .ndjson, .json (JSON Lines), "
                     "and gzipped .csv.gz/.jsonl.gz/.ndjson.gz/.json.gz")

_YEAR_MIN, _YEAR_MAX = 1990, 2100
_MIN_MS = int(datetime(_YEAR_MIN, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
_END_MS = int(datetime(_YEAR_MAX + 1, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)  # exclusive
# Epoch numbers below this are seconds, at or above it milliseconds. 1e11 s is the year 5138 and 1e11 ms is 1973,
# so for 1990..2100 the rule is unambiguous.
_SECONDS_BELOW = 1e11

_MONTH_RE = r"\d{4}-(0[1-9]|1[0-2])"
_NUMBER_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"  # an epoch number written as text
_LOOKS_LIKE_DATE = re.compile(r"\s*([+-]?\d{4,})-\d{1,2}")
_EXCERPT_CHARS = 200
_CHUNK_BYTES = 1 << 24  # line-by-line pass: bytes decoded at a time

# Reason kinds (the keys of ReadReport.reasons); each problem's message is "kind: detail".
TRUNCATED = "truncated line"
WRONG_FIELDS = "wrong number of fields"
BAD_JSON = "unparseable JSON"
NOT_OBJECT = "not a JSON object"
BAD_UTF8 = "invalid UTF-8"
MISSING = "missing required field"
WRONG_TYPE = "wrong type"
BAD_TIMESTAMP = "bad timestamp"
BAD_MONTH = "bad month"
BAD_SPEND = "bad spend"
DUPLICATE = "duplicate event"


class BadInputError(ValueError):
    """The input cannot be used as it is; the message says where (``file:line``) and why."""


@dataclass
class ReadReport:
    """What a read did. ``rows_read == rows_kept + rows_rejected`` always holds."""

    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reason kind -> count of rejected rows
    sessions_reordered: int = 0  # sessions whose events were not in time order in the file(s)
    unknown_columns: list[str] = field(default_factory=list)  # dropped from the output, never silently
    files: list[str] = field(default_factory=list)
    rejects_path: str | None = None  # set in on_bad_rows="skip" mode

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Table specs: events and billing go through the same machinery, differing only in columns and checks.


@dataclass(frozen=True)
class _Spec:
    name: str
    schema: pa.Schema
    required: tuple[str, ...]
    kinds: dict[str, str]  # column -> "str" | "timestamp" | "month" | "usd"
    key: tuple[str, ...]  # two rows with the same key are duplicates
    sort_by: tuple[str, ...]
    session: tuple[str, ...] | None  # columns naming a session, to count sessions reordered
    duplicate_kind: str
    default_rejects: str

    @property
    def columns(self) -> list[str]:
        return self.schema.names


_EVENTS = _Spec(
    name="events",
    schema=EVENT_SCHEMA,
    required=REQUIRED,
    kinds={c: ("timestamp" if c == "timestamp" else "str") for c in EVENT_SCHEMA.names},
    key=("user_id", "session_id", "timestamp", "service", "page"),
    sort_by=("user_id", "session_id", "timestamp"),
    session=("user_id", "session_id"),
    duplicate_kind=DUPLICATE,
    default_rejects="rejects.csv",
)
_BILLING = _Spec(
    name="billing",
    schema=BILLING_SCHEMA,
    required=tuple(BILLING_SCHEMA.names),
    kinds={"user_id": "str", "month": "month", "service": "str", "spend_usd": "usd"},
    key=("user_id", "month", "service"),
    sort_by=("user_id", "month", "service"),
    session=None,
    duplicate_kind="duplicate billing row",
    default_rejects="billing_rejects.csv",
)


# --------------------------------------------------------------------------------------------------------------
# Per-file parse results.


@dataclass(frozen=True)
class _Bad:
    file_idx: int
    line: int  # 1-based physical line (CSV/JSONL) or row (Parquet)
    kind: str
    detail: str
    excerpt: str

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class _Parsed:
    path: Path
    file_idx: int
    fmt: str
    frame: pd.DataFrame  # one row per record that parsed; the spec's columns found in the file, raw values
    lines: np.ndarray | None  # line (row for Parquet) of each frame row; None on the CSV/JSONL fast path
    bad: list[_Bad]  # records that did not parse at all
    unknown: set[str]

    def line_of(self, pos: int) -> int:
        assert self.lines is not None, "locations are only known after the line-by-line pass"
        return int(self.lines[pos])

    def excerpts_of(self, positions: list[int]) -> list[str]:
        """Excerpts of some frame rows: the raw line for CSV/JSONL (one more pass over the file, done only for
        bad rows, so the line-by-line pass need not keep every row's text), a repr of the row for Parquet."""
        if self.fmt == "parquet":
            return [repr({c: _plain(self.frame[c].iat[i]) for c in self.frame.columns})[:_EXCERPT_CHARS]
                    for i in positions]
        found = _line_excerpts(self.path, {self.line_of(i) for i in positions})
        return [found.get(self.line_of(i), "") for i in positions]


def _plain(v: Any) -> Any:
    """A readable scalar for excerpts (NaN/NaT as None, numpy scalars as Python ones)."""
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT:
        return None
    return v.item() if isinstance(v, np.generic) else v


def _location(path: Path | str, fmt: str, line: int) -> str:
    return f"{path}:row {line}" if fmt == "parquet" else f"{path}:{line}"


# --------------------------------------------------------------------------------------------------------------
# Files and formats.


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        # Parquet compresses internally; a gzipped Parquet file is not something pyarrow can read.
        fmt = _SUFFIX_FORMAT.get(suffixes[-2]) if len(suffixes) >= 2 else None
        return fmt if fmt in ("csv", "jsonl") else None
    return _SUFFIX_FORMAT.get(suffixes[-1]) if suffixes else None


def _list_files(path: Path, spec: _Spec, exclude: Path | None) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{spec.name}: no such file or directory: {path}")
    if not path.is_dir():
        if _format_of(path) is None:
            raise BadInputError(f"{path}: unsupported file type; supported formats: {SUPPORTED_FORMATS}")
        return [path]
    files, ignored = [], []
    for p in sorted(path.iterdir()):
        if p.name.startswith((".", "_")):  # hidden files and writer markers such as _SUCCESS
            log.debug("%s: skipping %s", spec.name, p)
            continue
        if exclude is not None and p.resolve() == exclude:
            log.info("%s: not reading %s: it is this read's rejects file", spec.name, p)
        elif p.is_file() and _format_of(p) is not None:
            files.append(p)
        else:
            ignored.append(p.name)
    if ignored:
        log.warning("%s: ignoring %d entries of %s that are not supported data files: %s",
                    spec.name, len(ignored), path, ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""))
    if not files:
        raise BadInputError(f"{path}: the directory holds no supported files ({SUPPORTED_FORMATS})")
    return files


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _check_columns(path: Path, names: list[str], spec: _Spec) -> None:
    missing = [c for c in spec.required if c not in names]
    if missing:
        raise BadInputError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(columns found: {', '.join(names) or 'none'}; required: {', '.join(spec.required)})"
        )


class _Lines:
    """The decoded lines of a CSV/JSONL file, for the line-by-line pass.

    The file is read and decoded in big chunks of whole lines and split by io.StringIO, so the per-line cost
    stays in C. Line numbers are physical lines (split at line feeds only, as `wc -l` counts). Invalid UTF-8 is
    replaced (so parsing goes on) and noted in ``bad_utf8`` by line.

    ``data``: instead of the whole file, these bytes of it (whole lines), which start at line ``first_line`` and
    byte ``offset`` of the file; line numbers stay the file's (streaming reads a file a block of lines at a time).
    """

    def __init__(self, path: Path, data: bytes | None = None, first_line: int = 1, offset: int = 0):
        self.path = path
        self.data, self.offset = data, offset
        self.first_line = first_line
        self.bad_utf8: dict[int, str] = {}  # line -> where the first invalid byte is
        self.n_lines = first_line - 1  # lines decoded so far
        self.ends_with_newline = True

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._chunks())

    def _chunks(self) -> Iterator[stdio.StringIO]:
        if self.data is not None:
            yield self._decoded(self.data, self.offset)
            return
        with _open_binary(self.path) as fh:
            offset, size = 0, 1 << 16  # small first chunk: often only the header is wanted
            while data := fh.read(size):
                if not data.endswith(b"\n"):
                    data += fh.readline()  # end the chunk on a line end, so no character is cut in two
                yield self._decoded(data, offset)
                offset += len(data)
                size = _CHUNK_BYTES

    def _decoded(self, data: bytes, offset: int) -> stdio.StringIO:
        skip = len(codecs.BOM_UTF8) if offset == 0 and data.startswith(codecs.BOM_UTF8) else 0
        try:
            text = data[skip:].decode("utf-8")
        except UnicodeDecodeError:
            text = self._decode_marking_bad(data, skip, offset)
        self.n_lines += data.count(b"\n")
        self.ends_with_newline = data.endswith(b"\n")
        return stdio.StringIO(text, newline="\n")

    def _decode_marking_bad(self, data: bytes, skip: int, offset: int) -> str:
        out = []
        line_start = offset + skip
        for n, raw in enumerate(data[skip:].split(b"\n"), start=self.n_lines + 1):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self.bad_utf8[n] = (f"byte 0x{raw[e.start]:02x} at line {n}, column {e.start + 1} "
                                    f"(byte offset {line_start + e.start})")
                out.append(raw.decode("utf-8", errors="replace"))
            line_start += len(raw) + 1
        return "\n".join(out)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while the line-by-line pass builds millions of small lists: they hold
    no cycles, and repeated full collections over them would otherwise cost more than the parsing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _excerpt(text: str) -> str:
    return text.rstrip("\r\n")[:_EXCERPT_CHARS]


def _line_excerpts(path: Path, wanted: set[int]) -> dict[int, str]:
    """Excerpts of some physical lines: one more pass over the file, made only when there are bad rows, so the
    line-by-line pass need not keep every row's text."""
    found: dict[int, str] = {}
    if not wanted:
        return found
    with _open_binary(path) as fh:
        for n, raw in enumerate(fh, start=1):
            if n in wanted:
                found[n] = _excerpt(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))
                if len(found) == len(wanted):
                    break
    return found


def _with_excerpts(path: Path, bad: list[_Bad]) -> list[_Bad]:
    texts = _line_excerpts(path, {b.line for b in bad if not b.excerpt})
    return [b if b.excerpt else dataclasses.replace(b, excerpt=texts.get(b.line, "")) for b in bad]


# --------------------------------------------------------------------------------------------------------------
# CSV


def _csv_header(path: Path, spec: _Spec) -> list[str]:
    """The header of a CSV file (its first non-blank record), checked for the required columns."""
    return _csv_header_and_end(path, spec)[0]


def _csv_header_and_end(path: Path, spec: _Spec) -> tuple[list[str], int]:
    """The header of a CSV file and the physical line it ends on."""
    lines = _Lines(path)
    reader = csv.reader(iter(lines))
    header = next((r for r in reader if r), None)
    if header is None:
        raise BadInputError(f"{path}: empty file; expected a header line naming the columns {', '.join(spec.columns)}")
    bad = [lines.bad_utf8[n] for n in range(1, reader.line_num + 1) if n in lines.bad_utf8]
    if bad:
        raise BadInputError(f"{path}:{reader.line_num}: invalid UTF-8 in the header line: {bad[0]}")
    _check_columns(path, header, spec)
    return header, reader.line_num


def _fast_csv(path: Path, idx: int, spec: _Spec) -> _Parsed | None:
    header = _csv_header(path, spec)
    try:
        table = pacsv.read_csv(
            path,
            # newlines_in_values: quoted fields may hold newlines (page titles, say); slower but correct.
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            # Everything as a string: ids keep leading zeros, and we parse timestamps ourselves. Unknown columns
            # are converted too, only so that pyarrow checks their UTF-8 as the line-by-line pass would.
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        log.debug("%s: pyarrow could not parse it (%s); reading it line by line", path, e)
        return None
    frame = _arrow_to_frame(table, spec, path, strict=False)
    if frame is None:
        log.debug("%s: a column has a type pyarrow cannot give us as is; reading it line by line", path)
        return None
    return _Parsed(path, idx, "csv", frame, None, [], set(header) - set(spec.kinds))


def _csv_records(path: Path, idx: int, n_fields: int) -> Iterator[tuple[int, list[str] | None, _Bad | None]]:
    """The data records of a CSV file (after its header) as the line-by-line pass reads them: ``(start line,
    fields, None)`` for a record that parsed, ``(start line, None, problem)`` for one that did not; blank lines are
    no records (pyarrow skips them too). Run it with the collector paused (`_gc_paused`) when keeping rows."""
    lines = _Lines(path)
    reader = csv.reader(iter(lines))
    if next((r for r in reader if r), None) is None:  # skip to the header, checked by the caller
        return
    bad_utf8 = lines.bad_utf8  # filled as the reader goes
    prev_end = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(): report it, go on after it
            start, prev_end = prev_end + 1, reader.line_num
            yield start, None, _Bad(idx, start, WRONG_FIELDS, f"unparseable CSV record: {e}", "")
            continue
        start, end = prev_end + 1, reader.line_num
        prev_end = end
        utf8 = bad_utf8 and next((bad_utf8[n] for n in range(start, end + 1) if n in bad_utf8), None)
        if len(fields) == n_fields and not utf8:  # the common case
            yield start, fields, None
        elif utf8:
            yield start, None, _Bad(idx, start, BAD_UTF8, utf8, "")
        elif not fields:  # a blank line: not a record (pyarrow skips them too)
            continue
        elif len(fields) < n_fields and not lines.ends_with_newline and end == lines.n_lines + 1:
            detail = f"expected {n_fields} fields, got {len(fields)}; the file ends mid-line"
            yield start, None, _Bad(idx, start, TRUNCATED, detail, "")
        else:
            detail = f"expected {n_fields} fields, got {len(fields)}"
            if end > start:
                detail += f" (the record spans lines {start}-{end}: an unbalanced quote?)"
            yield start, None, _Bad(idx, start, WRONG_FIELDS, detail, "")


def _slow_csv(path: Path, idx: int, spec: _Spec) -> _Parsed:
    header = _csv_header(path, spec)
    n_fields = len(header)
    rows: list[list[str]] = []
    starts = array("q")
    bad: list[_Bad] = []
    keep_row, keep_start, keep_bad = rows.append, starts.append, bad.append
    for start, fields, problem in _csv_records(path, idx, n_fields):
        if problem is None:
            keep_row(fields)
            keep_start(start)
        else:
            keep_bad(problem)
    columns = list(zip(*rows)) if rows else [()] * n_fields  # transpose in C rather than append per field
    frame = pd.DataFrame(
        {c: _str_series(columns[header.index(c)]) for c in dict.fromkeys(header) if c in spec.kinds},
        index=pd.RangeIndex(len(rows)),
    )
    return _Parsed(path, idx, "csv", frame, np.asarray(starts, dtype=np.int64), _with_excerpts(path, bad),
                   set(header) - set(spec.kinds))


# --------------------------------------------------------------------------------------------------------------
# JSON Lines


def _reject_json_array(path: Path) -> None:
    with _open_binary(path) as fh:
        head = fh.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        raise BadInputError(f"{path}: this is a JSON array; expected JSON Lines (one object per line)")


def _fast_jsonl(path: Path, idx: int, spec: _Spec) -> _Parsed | None:
    _reject_json_array(path)
    # Types are inferred, not declared: declaring a string column would make pyarrow refuse numeric ids, which are
    # fine. A column whose inferred type cannot be used (a text column that looked like timestamps, say) sends
    # the file to the line-by-line pass, which converts value by value.
    try:
        table = pajson.read_json(path)
        # pyarrow.json does not check UTF-8 on its own; a full validation does.
        table.validate(full=True)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:  # also: mixed types in a column, "Empty JSON file"
        log.debug("%s: pyarrow could not parse it (%s); reading it line by line", path, e)
        return None
    return _jsonl_parsed(table, path, idx, spec, None)


def _jsonl_parsed(table: pa.Table, path: Path, idx: int, spec: _Spec, lines: np.ndarray | None) -> _Parsed | None:
    """The `_Parsed` of a JSON Lines table pyarrow read (a whole file, or a block with its `lines`), or None to send
    it to the line-by-line pass."""
    # A required column that is absent or all null: absent from every record is a file-level error, null in every
    # record are row errors. Only the line-by-line pass can tell which.
    for c in spec.required:
        if c not in table.column_names or table[c].null_count == table.num_rows:
            return None
    frame = _arrow_to_frame(table, spec, path, strict=False)
    if frame is None:
        log.debug("%s: a column has a type pyarrow cannot give us as is; reading it line by line", path)
        return None
    return _Parsed(path, idx, "jsonl", frame, lines, [], set(table.column_names) - set(spec.kinds))


_JSON_TYPE = {dict: "object", list: "array", bool: "boolean", str: "string", int: "number", float: "number"}
_JSON_WANT = {"str": "a string", "month": "a 'YYYY-MM' string", "usd": "a number",
              "timestamp": "an ISO 8601 string or an epoch seconds/milliseconds number"}


def _json_value_problem(c: str, kind: str, v: Any) -> str | None:
    """Why a JSON value cannot go in column ``c``, or None. Numbers are fine where strings are expected
    (numeric ids), except for month; objects, arrays and booleans never are."""
    if isinstance(v, (dict, list, bool)) or (kind == "month" and not isinstance(v, str)):
        return f"{c} must be {_JSON_WANT[kind]}, got {_JSON_TYPE.get(type(v), type(v).__name__)} {json.dumps(v)[:60]}"
    return None


def _slow_jsonl(path: Path, idx: int, spec: _Spec, lines: _Lines | None = None,
                seen_before: frozenset[str] = frozenset()) -> _Parsed:
    """The line-by-line pass over a JSON Lines file, or over the block of its lines in ``lines`` (streaming; its
    records may lack a required column that ``seen_before``, the keys of the earlier blocks, holds)."""
    _reject_json_array(path)
    cols = list(spec.kinds)
    rows: list[list[Any]] = []
    seen: set[str] = set()
    starts = array("q")
    bad: list[_Bad] = []
    lines = lines if lines is not None else _Lines(path)
    bad_utf8 = lines.bad_utf8
    loads = json.loads
    for lineno, text in enumerate(lines, start=lines.first_line):
        if bad_utf8 and lineno in bad_utf8:
            bad.append(_Bad(idx, lineno, BAD_UTF8, bad_utf8[lineno], ""))
            continue
        try:
            obj = loads(text)
        except json.JSONDecodeError as e:
            stripped = text.strip()
            if not stripped:  # blank line
                continue
            # An error at the very end, or an unterminated string, means the line was cut short.
            if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
                end = "; the file ends mid-line" if not text.endswith("\n") else ""
                bad.append(_Bad(idx, lineno, TRUNCATED, f"the JSON record is incomplete ({e.msg}){end}", ""))
            else:
                bad.append(_Bad(idx, lineno, BAD_JSON, f"{e.msg} at column {e.colno}", ""))
            continue
        if type(obj) is not dict:
            bad.append(_Bad(idx, lineno, NOT_OBJECT, f"got a JSON {_JSON_TYPE.get(type(obj), 'value')}", ""))
            continue
        seen.update(obj)
        row = [obj.get(c) for c in cols]
        # Strings and nulls go through as they are; anything else is converted or refused, column by column.
        if not all(v is None or type(v) is str for v in row):
            problem = None
            for k, (c, v) in enumerate(zip(cols, row)):
                if v is None or type(v) is str:
                    continue
                problem = _json_value_problem(c, spec.kinds[c], v)
                if problem:
                    break
                row[k] = str(v) if isinstance(v, int) else repr(v)  # int or float
            if problem:
                bad.append(_Bad(idx, lineno, WRONG_TYPE, problem, ""))
                continue
        rows.append(row)
        starts.append(lineno)
    if rows or any(b.kind == WRONG_TYPE for b in bad):
        _check_columns(path, sorted(seen | seen_before), spec)
    columns = list(zip(*rows)) if rows else [()] * len(cols)
    frame = pd.DataFrame({c: _str_series(columns[k]) for k, c in enumerate(cols) if c in seen},
                         index=pd.RangeIndex(len(rows)))
    return _Parsed(path, idx, "jsonl", frame, np.asarray(starts, dtype=np.int64), _with_excerpts(path, bad),
                   seen - set(spec.kinds))


# --------------------------------------------------------------------------------------------------------------
# Parquet (no slow path: rows are already typed and addressable, so the fast path can locate problems itself)


def _read_parquet(path: Path, idx: int, spec: _Spec) -> _Parsed:
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise BadInputError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e
    _check_columns(path, names, spec)
    known = [c for c in dict.fromkeys(names) if c in spec.kinds]
    try:
        table = pq.read_table(path, columns=known)
    except (pa.ArrowInvalid, OSError) as e:
        raise BadInputError(f"{path}: cannot read the Parquet data (truncated or corrupt?): {e}") from e
    try:
        table.validate(full=True)  # Parquet readers do not check that strings are UTF-8
    except pa.ArrowInvalid as e:
        raise BadInputError(f"{path}: invalid string data (not UTF-8?) in a column: {e}") from e
    frame = _arrow_to_frame(table, spec, path, strict=True)
    assert frame is not None
    return _Parsed(path, idx, "parquet", frame, np.arange(1, len(frame) + 1, dtype=np.int64), [],
                   set(names) - set(spec.kinds))


def _arrow_to_frame(table: pa.Table, spec: _Spec, path: Path, strict: bool) -> pd.DataFrame | None:
    """Raw pandas columns from a pyarrow table: strings as pandas "str", timestamps/numbers as they are.

    A column of a type that cannot hold valid values (a struct where a string belongs) is a file-level error for
    Parquet (``strict``); for CSV/JSONL the answer is None, meaning: read the file line by line to find the rows.
    """
    out: dict[str, pd.Series] = {}
    for c in table.column_names:
        kind = spec.kinds.get(c)
        if kind is None:
            continue
        col = table[c]
        t = col.type
        if pa.types.is_dictionary(t):
            col, t = col.cast(t.value_type), t.value_type
        is_str = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
        ok = (
            (kind in ("str", "month") and (is_str or pa.types.is_integer(t)))
            or (kind == "timestamp" and (is_str or pa.types.is_integer(t) or pa.types.is_floating(t)
                                         or pa.types.is_timestamp(t)))
            or (kind == "usd" and (is_str or pa.types.is_integer(t) or pa.types.is_floating(t)
                                   or pa.types.is_decimal(t)))
        )
        if not ok:
            if strict:
                raise BadInputError(f"{path}: column {c!r} has type {t}, which cannot hold {kind} values")
            return None
        if is_str or kind in ("str", "month"):
            out[c] = col.cast(pa.string()).to_pandas()
        elif pa.types.is_timestamp(t):
            # As milliseconds (truncating, like ISO strings), so far-off years fit in pandas and reach the range check.
            out[c] = col.cast(pa.timestamp("ms", tz=t.tz), safe=False).to_pandas()
        else:
            out[c] = col.cast(pa.float64()).to_pandas()
    return pd.DataFrame(out, index=pd.RangeIndex(table.num_rows))


# --------------------------------------------------------------------------------------------------------------
# Vectorised validation


_PANDAS_3 = int(pd.__version__.split(".")[0]) >= 3


def _str_series(values: Any) -> pd.Series:
    """A text column whose missing values stay missing: pandas' "str" dtype on pandas >= 3; object on pandas 2,
    where the "str" dtype does not exist and astype(str) would turn NaN into the text 'nan'."""
    if _PANDAS_3:
        return pd.Series(values, dtype="str")
    s = pd.Series(values, dtype=object)
    return s.where(s.notna(), None)


def _blank(s: pd.Series) -> np.ndarray:
    """Null, or (for text) empty/whitespace-only."""
    m = s.isna().to_numpy(dtype=bool)
    if pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
        m = m | s.str.strip().eq("").to_numpy(dtype=bool, na_value=False)
    return m


# Timestamp parse status codes.
_TS_OK, _TS_MISSING, _TS_WRONG_TYPE, _TS_UNPARSEABLE, _TS_OUT_OF_RANGE = range(5)


def _parse_timestamps(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Epoch milliseconds (int64) and a status code per value."""
    n = len(raw)
    ms = np.zeros(n, dtype=np.int64)
    status = np.full(n, _TS_OK, dtype=np.int8)

    def from_epoch(num: np.ndarray, where: np.ndarray) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.where(np.abs(num) < _SECONDS_BELOW, num * 1000.0, num)
            v = np.round(v)  # epoch seconds * 1000 is not exact in floating point
            finite = np.isfinite(v)
            status[where[~finite]] = _TS_UNPARSEABLE
            in_range = finite & (v >= _MIN_MS) & (v < _END_MS)
            status[where[finite & ~in_range]] = _TS_OUT_OF_RANGE
            ms[where[in_range]] = v[in_range].astype(np.int64)

    def from_datetimes(dt: pd.Series, where: np.ndarray) -> None:
        if dt.dt.tz is None:  # naive timestamps are taken as UTC
            dt = dt.dt.tz_localize("UTC")
        v = dt.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[ms]").view(np.int64)
        in_range = (v >= _MIN_MS) & (v < _END_MS)
        status[where[~in_range]] = _TS_OUT_OF_RANGE
        ms[where[in_range]] = v[in_range]

    missing = _blank(raw)
    status[missing] = _TS_MISSING
    present = np.flatnonzero(~missing)
    if pd.api.types.is_datetime64_any_dtype(raw.dtype):
        from_datetimes(raw.iloc[present], present)
    elif pd.api.types.is_numeric_dtype(raw.dtype):
        from_epoch(raw.iloc[present].to_numpy(dtype=np.float64), present)
    else:
        text = raw.iloc[present].astype("str")
        # Which values are epoch numbers: a regex in pyarrow is much faster than pd.to_numeric over ISO strings.
        is_num = pc.match_substring_regex(pa.array(text, type=pa.string()), _NUMBER_RE)
        is_num = is_num.to_numpy(zero_copy_only=False).astype(bool)
        num = np.full(len(text), np.nan)
        num[is_num] = pd.to_numeric(text[is_num], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        is_num &= ~np.isnan(num)
        from_epoch(num[is_num], present[is_num])
        iso_at = present[~is_num]
        if len(iso_at):
            dt = pd.to_datetime(text[~is_num], format="ISO8601", utc=True, errors="coerce")
            ok = dt.notna().to_numpy()
            from_datetimes(dt[ok], iso_at[ok])
            for i in iso_at[~ok]:  # few: only values that are neither numbers nor ISO 8601
                m = _LOOKS_LIKE_DATE.match(str(raw.iat[i]))
                if m is None:
                    status[i] = _TS_WRONG_TYPE
                elif not _YEAR_MIN <= int(m.group(1)) <= _YEAR_MAX:
                    status[i] = _TS_OUT_OF_RANGE  # a year pandas cannot represent, e.g. 3000
                else:
                    status[i] = _TS_UNPARSEABLE
    return ms, status


def _describe_timestamp(value: Any, status: int) -> tuple[str, str]:
    shown = repr(value) if isinstance(value, str) else str(_plain(value))
    if status == _TS_WRONG_TYPE:
        return WRONG_TYPE, f"timestamp must be an ISO 8601 string or an epoch seconds/milliseconds number, got {shown}"
    if status == _TS_OUT_OF_RANGE:
        unit = ""
        with contextlib.suppress(TypeError, ValueError):
            unit = " (read as epoch seconds)" if abs(float(value)) < _SECONDS_BELOW else " (read as epoch milliseconds)"
        return BAD_TIMESTAMP, f"{shown}{unit} is outside {_YEAR_MIN}..{_YEAR_MAX}"
    return BAD_TIMESTAMP, f"cannot parse {shown} as a date and time"


def _validate(p: _Parsed, spec: _Spec) -> tuple[pd.DataFrame, list[_Bad]]:
    """Check every row of a parsed file; return its good rows in output types (plus ``_pos``) and its bad rows.

    Checks run column-wise over the whole file; only rows that fail are then described one by one. A row fails
    for one reason, the first of: missing required fields, then the column checks in schema order.
    """
    f = p.frame
    n = len(f)
    blank = {c: (_blank(f[c]) if c in f else np.ones(n, dtype=bool)) for c in spec.columns}
    checks: list[tuple[np.ndarray, Callable[[int], tuple[str, str]]]] = []

    missing_any = np.zeros(n, dtype=bool)
    for c in spec.required:
        missing_any |= blank[c]

    def describe_missing(i: int) -> tuple[str, str]:
        cols = [c for c in spec.required if blank[c][i]]
        detail = ", ".join(cols)
        if spec is _EVENTS and set(cols) <= {"service", "page"}:
            detail += " (a session record with no page event)"
        return MISSING, detail

    checks.append((missing_any, describe_missing))

    typed: dict[str, Any] = {}
    for c, kind in spec.kinds.items():
        if c not in f:
            continue
        s = f[c]
        if kind == "timestamp":
            ms, status = _parse_timestamps(s)
            typed[c] = ms
            checks.append((status >= _TS_WRONG_TYPE,
                           lambda i, s=s, status=status: _describe_timestamp(s.iat[i], int(status[i]))))
        elif kind == "month":
            bad_month = ~blank[c] & ~s.str.fullmatch(_MONTH_RE).to_numpy(dtype=bool, na_value=False)
            checks.append((bad_month, lambda i, s=s: (BAD_MONTH, f"month must be 'YYYY-MM', got {s.iat[i]!r}")))
        elif kind == "usd":
            num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            typed[c] = num
            not_number = ~blank[c] & np.isnan(num)
            with np.errstate(invalid="ignore"):
                negative = ~blank[c] & ~not_number & ~(np.isfinite(num) & (num >= 0))
            checks.append((not_number, lambda i, s=s, c=c: (WRONG_TYPE, f"{c} must be a number, got {s.iat[i]!r}")))
            checks.append((negative,
                           lambda i, s=s, c=c: (BAD_SPEND, f"{c} must be a non-negative number, got {s.iat[i]}")))

    bad_mask = np.zeros(n, dtype=bool)
    for mask, _ in checks:
        bad_mask |= mask
    bad: list[_Bad] = []
    bad_at = [int(i) for i in np.flatnonzero(bad_mask)]
    # On the fast path there are no lines to report yet: the caller re-reads the file line by line.
    located = p.lines is not None
    excerpts = p.excerpts_of(bad_at) if located and bad_at else [""] * len(bad_at)
    for i, ex in zip(bad_at, excerpts):
        for mask, describe in checks:
            if mask[i]:
                kind, detail = describe(i)
                break
        bad.append(_Bad(p.file_idx, p.line_of(i) if located else -1, kind, detail, ex))

    good = ~bad_mask
    all_good = not bad_mask.any()
    # A typed column can only be absent from a file without records (required columns are checked per file).
    for c, kind in spec.kinds.items():
        if kind in ("timestamp", "usd") and c not in typed:
            typed[c] = np.zeros(n, dtype=np.int64) if kind == "timestamp" else np.full(n, np.nan)
    out: dict[str, Any] = {}
    for fld in spec.schema:
        c, kind = fld.name, spec.kinds[fld.name]
        if kind == "timestamp":
            out[c] = pd.Series(typed[c][good].astype("datetime64[ms]")).dt.tz_localize("UTC")
        elif kind == "usd":
            out[c] = pd.Series(typed[c][good], dtype=np.float64)
        elif c in f:
            # CSV cannot tell an empty optional field from an absent one, so empty means absent everywhere.
            col = f[c].where(~blank[c]) if blank[c].any() else f[c]
            out[c] = _str_series((col if all_good else col[good]).reset_index(drop=True))
        else:
            out[c] = _str_series([None] * int(good.sum()))
    out["_pos"] = np.flatnonzero(good)
    return pd.DataFrame(out), bad


# --------------------------------------------------------------------------------------------------------------
# One file, then all of them


def _read_file(path: Path, idx: int, spec: _Spec, precise: bool = False) -> tuple[_Parsed, pd.DataFrame, list[_Bad]]:
    """Parse and validate one file; ``precise`` skips the fast path (line numbers needed)."""
    fmt = _format_of(path)
    if fmt == "parquet":
        p = _read_parquet(path, idx, spec)
    else:
        fast, slow = (_fast_csv, _slow_csv) if fmt == "csv" else (_fast_jsonl, _slow_jsonl)
        if not precise:
            p_fast = fast(path, idx, spec)
            if p_fast is not None:
                good, bad = _validate(p_fast, spec)
                if not bad:
                    return p_fast, good, bad
                log.debug("%s: %d bad rows; reading it line by line to locate them", path, len(bad))
        with _gc_paused():
            p = slow(path, idx, spec)
    good, bad = _validate(p, spec)
    return p, good, sorted(p.bad + bad, key=lambda b: b.line)


def _duplicates(goods: list[pd.DataFrame], spec: _Spec) -> pd.DataFrame:
    """Rows whose key equals an earlier row's: columns file, pos (in _Parsed.frame), file_first, pos_first."""
    key = list(spec.key)
    cols = key + ["_pos"]
    both = pd.concat([g[cols].assign(_file=i) for i, g in enumerate(goods)], ignore_index=True)
    involved = both.duplicated(key, keep=False)
    if not involved.any():
        return pd.DataFrame({c: pd.Series(dtype=np.int64) for c in ("file", "pos", "file_first", "pos_first")})
    sub = both[involved].rename(columns={"_file": "file", "_pos": "pos"})
    later = sub.duplicated(key, keep="first")
    first = sub[~later].rename(columns={"file": "file_first", "pos": "pos_first"})
    return sub[later].merge(first, on=key, how="left")[["file", "pos", "file_first", "pos_first"]]


def _format_problems(spec: _Spec, parsed: list[_Parsed], bad: list[_Bad], shown: int) -> str:
    counts = Counter(b.kind for b in bad)
    files = {b.file_idx for b in bad}
    head = (f"{spec.name}: {len(bad)} bad row(s) in {len(files)} file(s) "
            f"({', '.join(f'{k}: {v}' for k, v in counts.most_common())})")
    lines = [f"  {_location(parsed[b.file_idx].path, parsed[b.file_idx].fmt, b.line)}: {b.reason}" for b in bad[:shown]]
    if len(bad) > shown:
        lines.append(f"  ... and {len(bad) - shown} more")
    return "\n".join([head + ":", *lines])


def _write_rejects(bad: list[_Bad], parsed: list[_Parsed], path: Path) -> None:
    df = pd.DataFrame(
        {
            "file": [str(parsed[b.file_idx].path) for b in bad],
            "line": pd.Series([b.line for b in bad], dtype=np.int64),
            "reason": [b.reason for b in bad],
            "excerpt": [b.excerpt for b in bad],
        }
    )
    if path.suffix.lower() in (".parquet", ".pq"):
        write_parquet_atomic(df, path)
    else:
        data = df.to_csv(index=False).encode("utf-8")
        _atomic_write(path, lambda fh: fh.write(data))


def _sort_and_count_reordered(df: pd.DataFrame, spec: _Spec) -> tuple[pd.DataFrame, int]:
    """Sort ``df`` (in file order) stably by spec.sort_by; also count sessions whose timestamps went backwards.

    Works on integer codes rather than strings: sorting millions of rows of text columns in pandas is slow.
    """
    codes = [pd.factorize(df[c], sort=True)[0] for c in spec.sort_by if c != "timestamp"]
    ts = (df["timestamp"].dt.tz_localize(None).to_numpy().astype("datetime64[ms]").view(np.int64)
          if "timestamp" in df else None)
    order_file = np.arange(len(df))
    keys = []
    it = iter(codes)
    for c in spec.sort_by:
        keys.append(ts if c == "timestamp" else next(it))
    order = np.lexsort((order_file, *reversed(keys)))  # np.lexsort: the last key is the primary one
    reordered = 0
    if spec.session is not None and len(df) > 1:
        # Sorted by time (ties in file order), a session's rows keep their file order exactly when the file had
        # them in time order; so a session was reordered iff its file positions go down somewhere.
        same = np.ones(len(df) - 1, dtype=bool)
        for c in codes[: len(spec.session)]:  # the session columns lead spec.sort_by
            cs = c[order]
            same &= cs[1:] == cs[:-1]
        back = same & (order[1:] < order[:-1])
        if back.any():
            session_no = np.concatenate([[0], np.cumsum(~same)])
            reordered = len(np.unique(session_no[1:][back]))
    return df.iloc[order].reset_index(drop=True), reordered


def _read(
    path: str | os.PathLike,
    spec: _Spec,
    on_bad_rows: OnBadRows,
    max_bad_fraction: float,
    rejects_path: str | os.PathLike | None,
    max_errors_shown: int,
) -> tuple[pd.DataFrame, ReadReport]:
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    rejects = Path(rejects_path) if rejects_path is not None else Path.cwd() / spec.default_rejects
    files = _list_files(Path(path), spec, exclude=rejects.resolve())

    parsed, goods, bads = [], [], []
    for i, f in enumerate(files):
        p, g, b = _read_file(f, i, spec)
        parsed.append(p)
        goods.append(g)
        bads.append(b)

    # Duplicates span files. Locating them needs line numbers, so a file read by the fast path that holds a
    # duplicate (or the original it copies) is read again line by line, and the search repeated.
    while True:
        dups = _duplicates(goods, spec)
        unlocated = sorted({int(i) for i in pd.concat([dups["file"], dups["file_first"]])
                            if parsed[int(i)].lines is None})
        if not unlocated:
            break
        for i in unlocated:
            parsed[i], goods[i], bads[i] = _read_file(files[i], i, spec, precise=True)

    for i, per_file in dups.groupby("file"):
        p = parsed[int(i)]
        positions = [int(x) for x in per_file["pos"]]
        for pos, first_file, first_pos, ex in zip(positions, per_file["file_first"], per_file["pos_first"],
                                                  p.excerpts_of(positions)):
            first = parsed[int(first_file)]
            where = _location(first.path, first.fmt, first.line_of(int(first_pos)))
            bads[int(i)].append(_Bad(int(i), p.line_of(pos), spec.duplicate_kind,
                                     f"same {', '.join(spec.key)} as {where}", ex))
        goods[int(i)] = goods[int(i)][~goods[int(i)]["_pos"].isin(positions)]
        bads[int(i)].sort(key=lambda b: b.line)

    bad = [b for per_file in bads for b in per_file]
    df = pd.concat(goods, ignore_index=True)
    report = ReadReport(
        rows_read=sum(len(p.frame) + len(p.bad) for p in parsed),
        rows_kept=len(df),
        rows_rejected=len(bad),
        reasons=dict(Counter(b.kind for b in bad).most_common()),
        unknown_columns=sorted(set().union(*(p.unknown for p in parsed))),
        files=[str(f) for f in files],
    )
    if report.rows_read != report.rows_kept + report.rows_rejected:  # not `assert`: must survive python -O
        raise AssertionError(f"{spec.name}: row accounting is off: {report}")

    if report.unknown_columns:
        log.warning("%s: dropping columns not in the schema: %s", spec.name, ", ".join(report.unknown_columns))
    if bad and on_bad_rows == "error":
        raise BadInputError(
            _format_problems(spec, parsed, bad, max_errors_shown)
            + "\nFix the input, or read with on_bad_rows='skip' to drop bad rows into a rejects file."
        )
    if on_bad_rows == "skip":
        _write_rejects(bad, parsed, rejects)
        report.rejects_path = str(rejects)
        if bad:
            log.warning("%s: rejected %d of %d rows (%s); see %s", spec.name, len(bad), report.rows_read,
                        ", ".join(f"{k}: {v}" for k, v in report.reasons.items()), rejects)
        if report.rows_read and len(bad) / report.rows_read > max_bad_fraction:
            raise BadInputError(
                f"{spec.name}: {len(bad)} of {report.rows_read} rows are bad "
                f"({len(bad) / report.rows_read:.2%}), more than max_bad_fraction={max_bad_fraction:.2%}; "
                f"see the rejects file {rejects}\n" + _format_problems(spec, parsed, bad, max_errors_shown)
            )

    df, report.sessions_reordered = _sort_and_count_reordered(df, spec)
    df = df[spec.columns]
    if report.sessions_reordered:
        log.info("%s: %d session(s) had events out of time order in the input; sorted by time",
                 spec.name, report.sessions_reordered)
    log.info("%s: read %d rows from %d file(s): kept %d, rejected %d", spec.name, report.rows_read,
             len(files), report.rows_kept, report.rows_rejected)
    return df, report


# --------------------------------------------------------------------------------------------------------------
# Public API


def read_events(
    path: str | os.PathLike,
    on_bad_rows: OnBadRows = "error",
    max_bad_fraction: float = 0.01,
    rejects_path: str | os.PathLike | None = None,
    max_errors_shown: int = 5,
) -> tuple[pd.DataFrame, ReadReport]:
    """Read an event table (a Parquet/CSV/JSONL file, or a directory of them read in sorted order).

    Returns the events with exactly the EVENT_SCHEMA columns (absent optional columns are all-missing; string
    columns use pandas' "str" dtype, timestamps ``datetime64[ms, UTC]``), sorted stably by user_id,
    session_id, timestamp; and a ReadReport.

    on_bad_rows="error": any bad row raises BadInputError listing ``file:line: reason`` for the first
    ``max_errors_shown`` problems and the total count. on_bad_rows="skip": bad rows are written to
    ``rejects_path`` (CSV, or Parquet by suffix; default ``./rejects.csv``), and BadInputError is raised only
    when more than ``max_bad_fraction`` of the rows are bad.

    Raises FileNotFoundError for a missing path, BadInputError for an unsupported file, a file missing a
    required column, or bad rows as above.
    """
    return _read(path, _EVENTS, on_bad_rows, max_bad_fraction, rejects_path, max_errors_shown)


def changes(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n,) bool: row i differs from row i-1 (row 0: True)."""
    n = len(arr)
    out = np.ones(n, bool)
    if n > 1:
        out[1:] = pc.not_equal(arr.slice(1), arr.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return out


def parquet_user_tables(pf: pq.ParquetFile, columns: list[str], batch_rows: int) -> Iterator[tuple[int, pa.Table]]:
    """(first row index, table) of consecutive whole users of a Parquet file grouped by user_id: record batches
    cut at their last user boundary (that user may go on in the next batch); small batches (they end at row
    groups) are gathered first. Memory: about one batch, whatever the file's size (open `pf` with
    ``pre_buffer=False``: pyarrow otherwise keeps every column chunk it has read)."""
    carry: pa.Table | None = None
    row0 = 0
    for rb in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True):
        t = pa.Table.from_batches([rb])
        if carry is not None:
            t = pa.concat_tables([carry, t])
        if t.num_rows < batch_rows // 2:  # less per-batch overhead
            carry = t
            continue
        cut = int(np.flatnonzero(changes(t.column("user_id")))[-1])  # first row of the batch's last user
        if cut == 0:  # one user so far
            carry = t
            continue
        yield row0, t.slice(0, cut)
        row0 += cut
        carry = t.slice(cut)
    if carry is not None and carry.num_rows:
        yield row0, carry


def reappears_message(path: Path, user: str, line: int, fmt: str = "parquet") -> str:
    """A user found again after its rows ended, at ``line`` (a 1-based Parquet row, or a CSV/JSONL line)."""
    return (f"{_location(path, fmt, line)}: user {user!r} reappears after its rows ended: streaming needs "
            "each user's rows together (sort the file by user_id)")


def validate_rows(t: pa.Table, path: str | os.PathLike, lines: np.ndarray, kind: str = "events",
                  max_errors_shown: int = 5, unknown: set[str] | None = None) -> pd.DataFrame:
    """Rows of a Parquet file (`lines`: their 1-based row numbers) checked as ``read_events`` / ``read_billing``
    check them (on_bad_rows="error": a bad row raises BadInputError listing ``file:row N: reason``; duplicates
    only among these rows). Returns the schema's columns plus ``_line``, sorted stably by the schema's key."""
    spec = {"events": _EVENTS, "billing": _BILLING}[kind]
    path = Path(path)
    try:
        t.validate(full=True)
    except pa.ArrowInvalid as e:
        raise BadInputError(f"{path}: invalid string data (not UTF-8?) near row {int(lines[0]) if len(lines) else 1}: "
                            f"{e}") from e
    t = t.select([c for c in t.column_names if c in spec.kinds])
    frame = _arrow_to_frame(t, spec, path, strict=True)
    parsed = _Parsed(path, 0, "parquet", frame, np.asarray(lines, dtype=np.int64), [], set(unknown or ()))
    good, bad = _validate(parsed, spec)
    dups = _duplicates([good], spec)
    for pos, first_pos, ex in zip(dups["pos"], dups["pos_first"], parsed.excerpts_of([int(x) for x in dups["pos"]])):
        bad.append(_Bad(0, parsed.line_of(int(pos)), spec.duplicate_kind,
                        f"same {', '.join(spec.key)} as {_location(path, 'parquet', parsed.line_of(int(first_pos)))}",
                        ex))
    if bad:
        raise BadInputError(_format_problems(spec, [parsed], sorted(bad, key=lambda b: b.line), max_errors_shown)
                            + "\nFix the input, or read it whole with read_events(on_bad_rows='skip').")
    df, _ = _sort_and_count_reordered(good, spec)
    out = df[spec.columns].copy()
    out["_line"] = np.asarray(lines, dtype=np.int64)[df["_pos"].to_numpy(dtype=np.int64)]
    return out


def iter_events_by_user(
    path: str | os.PathLike, batch_users: int = 1000, batch_rows: int = 262_144, max_errors_shown: int = 5,
) -> Iterator[pd.DataFrame]:
    """Stream a Parquet event file as event tables of about `batch_users` whole users each, validated like
    ``read_events`` (on_bad_rows="error"): memory holds one batch of users, never the whole file.

    The file must hold each user's rows together (grouped by user_id, e.g. sorted): a user that reappears after
    its rows ended raises BadInputError naming the file and row. A bad row raises BadInputError listing
    ``file:row N: reason`` as ``read_events`` does. Each table is sorted by user_id, session_id, timestamp.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if _format_of(path) != "parquet":
        raise BadInputError(f"{path}: iter_events_by_user reads Parquet only (use stream_events for CSV / JSONL)")
    spec = _EVENTS
    pf, names, known = _open_parquet(path, spec)
    unknown = set(names) - set(spec.kinds)
    if unknown:
        log.warning("%s: dropping columns not in the schema: %s", spec.name, ", ".join(sorted(unknown)))
    seen: set[str] = set()  # user ids whose rows have ended (ids only: small next to the events)
    pending: list[pd.DataFrame] = []

    def validated(t: pa.Table, first_row: int) -> pd.DataFrame:
        df = validate_rows(t, path, np.arange(first_row + 1, first_row + t.num_rows + 1, dtype=np.int64),
                           "events", max_errors_shown, unknown)
        users = pd.unique(df["user_id"])
        again = [u for u in users if u in seen]
        if again:
            i = int(np.flatnonzero(df["user_id"].to_numpy() == again[0])[0])
            raise BadInputError(reappears_message(path, again[0], int(df["_line"].iloc[i])))
        seen.update(users)
        return df.drop(columns="_line")

    n_users = 0
    for row0, t in parquet_user_tables(pf, known, batch_rows):
        pending.append(validated(t, row0))
        n_users += pending[-1]["user_id"].nunique()
        if n_users >= batch_users:
            yield pd.concat(pending, ignore_index=True)
            pending, n_users = [], 0
    if pending:
        yield pd.concat(pending, ignore_index=True)


def read_billing(
    path: str | os.PathLike,
    on_bad_rows: OnBadRows = "error",
    max_bad_fraction: float = 0.01,
    rejects_path: str | os.PathLike | None = None,
    max_errors_shown: int = 5,
) -> tuple[pd.DataFrame, ReadReport]:
    """Read a billing table (BILLING_SCHEMA: user_id, month 'YYYY-MM', service, spend_usd >= 0), as read_events.

    Rows repeating an earlier (user_id, month, service) are duplicates. The default rejects file is
    ``./billing_rejects.csv`` so it does not overwrite the events' one.
    """
    return _read(path, _BILLING, on_bad_rows, max_bad_fraction, rejects_path, max_errors_shown)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temp file in the same folder, fsync, then os.replace: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would have (or the old file's).
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (POSIX; not possible on Windows).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_parquet_atomic(
    table_or_df: pa.Table | pd.DataFrame, path: str | os.PathLike, schema: pa.Schema | None = None
) -> Path:
    """Write a Parquet file so that a crash mid-write leaves any previous file at ``path`` intact.

    ``schema`` (e.g. EVENT_SCHEMA) selects and casts the columns. Returns the path written.
    """
    path = Path(path)
    if isinstance(table_or_df, pd.DataFrame):
        table = pa.Table.from_pandas(table_or_df, schema=schema, preserve_index=False)
        if schema is None:  # pandas' "str" columns arrive as large_string; plain string is what readers expect
            table = table.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f
                                          for f in table.schema], metadata=table.schema.metadata))
    else:
        table = table_or_df if schema is None else table_or_df.select(schema.names).cast(schema)
    _atomic_write(path, lambda fh: pq.write_table(table, fh))
    return path


# --------------------------------------------------------------------------------------------------------------
# Streaming a file or a folder of any supported format by user (`sessionbert recommend` for CSV / JSONL / folders)

_STREAM_BLOCK_BYTES = 1 << 22  # CSV / JSONL bytes parsed at a time (a pyarrow CSV block, a block of JSON lines);
# pyarrow's streaming CSV reader decodes a few dozen blocks ahead (100-150 MB of Arrow memory at 4 MiB, measured)
_STREAM_SCAN_RECORDS = 100_000  # after a CSV parse error: records read on past the first problem, for the message
_STREAM_TAIL = "\nFix the input, or read it whole with read_events(on_bad_rows='skip')."
# (block's records, their lines, their `_validate` result when the reader already has it)
_BlockIter = Iterator[tuple[_Parsed, np.ndarray, tuple[pd.DataFrame, list[_Bad]] | None]]


class _CsvLocator:
    """Physical lines of CSV records read by pyarrow, which knows no lines. A record's provisional line is its
    index among the data records + the header's last line + 1, the physical line unless a blank line or a quoted
    newline came before it; `exact` turns provisional lines into physical ones by reading the file line by line
    (`_csv_records`, read_events' own line-by-line pass) up to the last record asked for. Only error messages need
    it, so a clean file is never read in Python."""

    def __init__(self, path: Path, idx: int, n_fields: int, header_end: int):
        self.path, self.idx, self.n_fields, self.header_end = path, idx, n_fields, header_end

    def exact(self, provisional: np.ndarray) -> np.ndarray:
        rec = np.asarray(provisional, dtype=np.int64) - self.header_end - 1
        want = np.unique(rec)
        found: dict[int, int] = {}
        j = 0
        if len(want):
            for k, (start, _, _) in enumerate(_csv_records(self.path, self.idx, self.n_fields)):
                if k == want[j]:
                    found[k] = start
                    j += 1
                    if j == len(want):
                        break
        return np.array([found.get(int(r), int(r) + self.header_end + 1) for r in rec], dtype=np.int64)


def _csv_blocks(path: Path, idx: int, spec: _Spec, header: list[str], header_end: int, block_bytes: int,
                on_problems: Callable[[list[_Bad], str], None]) -> _BlockIter:
    """Blocks of a CSV file read by pyarrow's streaming reader (every column as text, as `_fast_csv` reads it),
    with their records' provisional lines (`_CsvLocator`). A block pyarrow cannot parse is handed to
    `on_problems` with the bad records the line-by-line pass finds from there on."""
    unknown = set(header) - set(spec.kinds)
    done = 0  # records read so far

    def parse_failed(e: Exception) -> None:
        bad: list[_Bad] = []
        first = -1
        for k, (_, _, problem) in enumerate(_csv_records(path, idx, len(header))):
            if k < done:
                continue
            if problem is not None:
                bad.append(problem)
                first = k if first < 0 else first
            if first >= 0 and (k - first >= _STREAM_SCAN_RECORDS or len(bad) >= 10_000):
                break
        on_problems(bad, f"{path}: cannot parse the CSV after line {header_end + done}: {e}")

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_bytes),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        parse_failed(e)
        return
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            parse_failed(e)
            return
        frame = _arrow_to_frame(pa.Table.from_batches([batch]), spec, path, strict=False)
        if frame is None:  # pyarrow named the columns otherwise than the header line: not expected
            raise BadInputError(f"{path}: pyarrow reads the header as {batch.schema.names}, not {header}; "
                                "read the file whole")
        first = header_end + 1 + done
        yield _Parsed(path, idx, "csv", frame, None, [], unknown), np.arange(first, first + batch.num_rows), None
        done += batch.num_rows


def _record_lines(body: bytes, first_line: int) -> np.ndarray:
    """Lines of the non-blank lines of a block of JSON lines that starts at ``first_line``: the records pyarrow
    reads (it skips blank and whitespace-only lines)."""
    a = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(a)]])
    # A line that starts with a non-blank byte has ink (nearly all); the few others are looked at one by one.
    first = np.where(ends > starts, a[np.minimum(starts, len(a) - 1)] if len(a) else 32, 32)
    has = ~np.isin(first, (9, 13, 32))
    for i in np.flatnonzero(~has & (ends > starts)):
        has[i] = bool(body[starts[i]:ends[i]].strip(b" \t\r"))
    return first_line + np.flatnonzero(has).astype(np.int64)


def _fast_jsonl_block(path: Path, idx: int, spec: _Spec, body: bytes, lines: np.ndarray) -> _Parsed | None:
    """`_fast_jsonl` on a block of lines: None sends the block to the line-by-line pass."""
    try:
        table = pajson.read_json(pa.BufferReader(body))
        table.validate(full=True)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        log.debug("%s: pyarrow could not parse a block from line %d (%s); reading it line by line",
                  path, lines[0] if len(lines) else 0, e)
        return None
    if table.num_rows != len(lines):  # records are not one per non-blank line: let the line-by-line pass say why
        return None
    return _jsonl_parsed(table, path, idx, spec, lines)


def _jsonl_blocks(path: Path, idx: int, spec: _Spec, block_bytes: int) -> _BlockIter:
    """Blocks of whole lines of a JSON Lines file, parsed by pyarrow.json (or line by line when pyarrow cannot, or
    a record is bad: read_events' two passes, on the block), with each record's line."""
    _reject_json_array(path)
    seen: set[str] = set()  # keys met in earlier blocks
    with _open_binary(path) as fh:
        offset, first_line = 0, 1
        while data := fh.read(block_bytes):
            if not data.endswith(b"\n"):
                data += fh.readline()  # whole lines only
            body = data[len(codecs.BOM_UTF8):] if offset == 0 and data.startswith(codecs.BOM_UTF8) else data
            p = _fast_jsonl_block(path, idx, spec, body, _record_lines(body, first_line))
            checked = None if p is None else _validate(p, spec)
            if checked is None or checked[1]:  # bad rows are described from the line-by-line pass, as read_events does
                with _gc_paused():
                    p = _slow_jsonl(path, idx, spec, _Lines(path, data, first_line, offset), frozenset(seen))
                checked = None
            seen.update(p.frame.columns)
            seen.update(p.unknown)
            yield p, p.lines, checked
            first_line += data.count(b"\n")
            offset += len(data)


def _open_parquet(path: Path, spec: _Spec) -> tuple[pq.ParquetFile, list[str], list[str]]:
    """A Parquet file opened for streaming, its column names, and those of them in `spec` (checked: a missing
    required column or an unreadable file is a BadInputError naming the file)."""
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre_buffer would keep every chunk read: memory grows
    except (pa.ArrowInvalid, OSError) as e:
        raise BadInputError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from e
    names = pf.schema_arrow.names
    _check_columns(path, names, spec)
    return pf, names, [c for c in dict.fromkeys(names) if c in spec.kinds]


def _parquet_blocks(path: Path, idx: int, spec: _Spec, batch_rows: int) -> _BlockIter:
    pf, names, known = _open_parquet(path, spec)
    row0 = 0
    batches = pf.iter_batches(batch_size=max(1, min(batch_rows, 1 << 16)), columns=known)
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as e:
            raise BadInputError(f"{path}: cannot read the Parquet data (truncated or corrupt?): {e}") from e
        t = pa.Table.from_batches([rb])
        try:
            t.validate(full=True)  # Parquet readers do not check that strings are UTF-8
        except pa.ArrowInvalid as e:
            raise BadInputError(f"{path}: invalid string data (not UTF-8?) near row {row0 + 1}: {e}") from e
        lines = np.arange(row0 + 1, row0 + 1 + t.num_rows, dtype=np.int64)
        yield _Parsed(path, idx, "parquet", _arrow_to_frame(t, spec, path, strict=True), lines, [],
                      set(names) - set(spec.kinds)), lines, None
        row0 += t.num_rows


def stream_events(path: str | os.PathLike, batch_rows: int = 262_144, max_errors_shown: int = 5,
                  block_bytes: int = _STREAM_BLOCK_BYTES) -> Iterator[pd.DataFrame]:
    """Stream an event file, or a folder of them (Parquet, CSV, JSONL, read in sorted order as one stream), as
    tables of consecutive whole users of about `batch_rows` rows each, validated like ``read_events``
    (on_bad_rows="error"). Memory holds about one table and one block of the file (`block_bytes` of CSV / JSONL),
    never the file.

    CSV is read by pyarrow's streaming CSV reader, every column as text (as ``read_events`` reads it); JSON Lines
    in blocks of whole lines parsed by ``pyarrow.json``, a block pyarrow cannot parse (or that holds a bad record)
    going through ``read_events``' line-by-line pass; Parquet in record batches. A user's rows may straddle blocks
    (and files): they are carried into the next table, never split.

    The input must hold each user's rows together (grouped by user_id, e.g. sorted): a user found again after
    its rows ended raises BadInputError naming the file and line (``file:row N`` for Parquet). Bad rows raise
    BadInputError listing ``file:line: reason`` as ``read_events`` does, for the first block that holds any; lines
    are physical, the CSV header being line 1. Duplicate events are found within a user (their key holds the
    user_id, so the rest of the input cannot hold one).

    Each table is sorted by user_id, session_id, timestamp and has the EVENT_SCHEMA columns plus ``_file`` (index
    into the input's files in sorted order) and ``_line``: each row's line (JSONL), row (Parquet) or, for CSV, the
    record's index among the data records + the header's line + 1 (pyarrow knows no lines: that is the physical
    line unless a blank line or a quoted newline came before; messages give physical lines, `_CsvLocator`).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    spec = _EVENTS
    files = _list_files(Path(path), spec, exclude=None)
    stubs = [_Parsed(f, i, str(_format_of(f)), pd.DataFrame(), None, [], set()) for i, f in enumerate(files)]
    exact: dict[int, Callable[[np.ndarray], np.ndarray]] = {}  # CSV files: provisional -> physical lines

    def located(file_idx: np.ndarray, lines: np.ndarray) -> np.ndarray:
        out = np.asarray(lines, dtype=np.int64).copy()
        file_idx = np.asarray(file_idx)
        for i in np.unique(file_idx):
            if int(i) in exact:
                at = file_idx == i
                out[at] = exact[int(i)](out[at])
        return out

    def fail(bad: list[_Bad], otherwise: str = "") -> None:
        if not bad:
            raise BadInputError(otherwise)
        bad = sorted(bad, key=lambda b: (b.file_idx, b.line))
        raise BadInputError(_format_problems(spec, stubs, bad, max_errors_shown) + _STREAM_TAIL)

    def blocks(i: int, f: Path) -> _BlockIter:
        fmt = stubs[i].fmt
        if fmt == "csv":
            header, header_end = _csv_header_and_end(f, spec)
            exact[i] = _CsvLocator(f, i, len(header), header_end).exact
            return _csv_blocks(f, i, spec, header, header_end, block_bytes, fail)
        if fmt == "jsonl":
            return _jsonl_blocks(f, i, spec, block_bytes)
        return _parquet_blocks(f, i, spec, batch_rows)

    def validated() -> Iterator[pd.DataFrame]:
        for i, f in enumerate(files):
            warned = False
            for p, lines, checked in blocks(i, f):
                if p.unknown and not warned:
                    log.warning("%s: dropping columns not in the schema: %s", f, ", ".join(sorted(p.unknown)))
                    warned = True
                good, bad = checked or _validate(p, spec)
                if p.bad or bad:
                    if p.lines is None:  # CSV: find the block's physical lines, then describe its bad rows
                        p.lines = located(np.full(len(lines), i), lines)
                        good, bad = _validate(p, spec)
                    fail(p.bad + bad)
                pos = good.pop("_pos").to_numpy()
                good["_file"] = np.full(len(good), i, dtype=np.int32)
                good["_line"] = np.asarray(lines, dtype=np.int64)[pos]
                yield good

    seen: set = set()  # users whose rows have ended (ids only: small next to the events)

    def whole_users(t: pd.DataFrame) -> pd.DataFrame:
        u = t["user_id"].to_numpy(dtype=object)
        runs = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
        ru = u[runs]
        again = pd.Index(ru).duplicated() | np.fromiter((x in seen for x in ru), dtype=bool, count=len(ru))
        if again.any():  # a user in two runs of rows, or one that a previous table ended
            r = int(runs[int(np.argmax(again))])
            i = int(t["_file"].iat[r])
            line = int(located(np.array([i]), np.array([t["_line"].iat[r]]))[0])
            raise BadInputError(reappears_message(files[i], u[r], line, stubs[i].fmt))
        seen.update(ru.tolist())
        dups = _duplicates([t.assign(_pos=np.arange(len(t)))], spec)
        if len(dups):
            pos, first = dups["pos"].to_numpy(dtype=np.int64), dups["pos_first"].to_numpy(dtype=np.int64)
            fi = t["_file"].to_numpy()
            at = np.concatenate([pos, first])
            li = located(fi[at], t["_line"].to_numpy()[at])
            fail([_Bad(int(fi[p]), int(li[k]), spec.duplicate_kind,
                       f"same {', '.join(spec.key)} as "
                       f"{_location(files[fi[q]], stubs[fi[q]].fmt, int(li[len(pos) + k]))}", "")
                  for k, (p, q) in enumerate(zip(pos, first))])
        df, _ = _sort_and_count_reordered(t, spec)
        return df[[*spec.columns, "_file", "_line"]]

    pending: list[pd.DataFrame] = []
    n = 0
    for g in validated():
        if not len(g):
            continue
        pending.append(g)
        n += len(g)
        if n < batch_rows:
            continue
        t = pd.concat(pending, ignore_index=True)
        u = t["user_id"].to_numpy(dtype=object)
        cut = int(np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))[-1])  # first row of the last user
        if cut == 0:  # one user so far: read on
            pending, n = [t], len(t)
            continue
        yield whole_users(t.iloc[:cut].reset_index(drop=True))
        rest = t.iloc[cut:].reset_index(drop=True)
        pending, n = [rest], len(rest)
    if n:
        yield whole_users(pd.concat(pending, ignore_index=True))
