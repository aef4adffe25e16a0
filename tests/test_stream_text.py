"""Streaming CSV / JSONL (and folders) by user (`io.stream_events`, the `sessionbert recommend` input path): the
same rows as `read_events`, users never split across blocks, and the same `file:line: reason` messages."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from sessionbert.data import io as sio
from sessionbert.data.io import BadInputError, read_events

HEADER = "user_id,session_id,timestamp,service,page,page_title,action,region"
MIN_HEADER = "user_id,session_id,timestamp,service,page"


def _rows(n_users: int = 30, per_user: int = 7) -> list[dict]:
    """Users of `per_user` events each (two sessions, out of time order within the second), grouped by user."""
    rows = []
    for u in range(n_users):
        for j in range(per_user):
            rows.append({"user_id": f"u{u:03d}", "session_id": f"s{u}-{j // 4}",
                         "timestamp": f"2023-03-{1 + (j // 4):02d}T10:{(7 - j) % 7:02d}:00Z", "service": f"svc{j % 3}",
                         "page": f"/p{j}", "page_title": "Title, with comma" if j == 1 else None,
                         "action": f"act {u}" if j == 2 else None, "region": "eu-west-1" if j % 2 else None})
    return rows


def _csv(path: Path, rows: list[dict], header: str = HEADER, extra: dict[int, str] | None = None) -> Path:
    """A CSV file of `rows`; `extra` puts raw text lines before the row of that index (blank lines, say)."""
    cols = header.split(",")

    def cell(v):
        if v is None:
            return ""
        v = str(v)
        return '"' + v.replace('"', '""') + '"' if any(ch in v for ch in ',"\n') else v

    out = [header]
    for i, r in enumerate(rows):
        if extra and i in extra:
            out.append(extra[i])
        out.append(",".join(cell(r.get(c)) for c in cols))
    return _write_lines(path, out)


def _jsonl(path: Path, rows: list[dict], extra: dict[int, str] | None = None) -> Path:
    out = []
    for i, r in enumerate(rows):
        if extra and i in extra:
            out.append(extra[i])
        out.append(json.dumps(r))
    return _write_lines(path, out)


def _write_lines(path: Path, lines: list[str]) -> Path:
    """`lines` as a text file, gzip-compressed when the name ends in .gz."""
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _problems(msg: str) -> list[str]:
    """The `file:line: reason` lines of a BadInputError message (and its first line, the count by kind)."""
    lines = msg.splitlines()
    return [lines[0]] + [ln for ln in lines[1:] if ln.startswith("  ")]


def _stream_error(path: Path, **kw) -> tuple[str, int]:
    """The message of the BadInputError that streaming `path` raises, and how many tables came before it."""
    n = 0
    with pytest.raises(BadInputError) as exc:
        for _ in sio.stream_events(path, **kw):
            n += 1
    return str(exc.value), n


# ---- same rows as read_events, users whole ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "csv.gz", "jsonl.gz", "dir"])
def test_streamed_blocks_equal_read_events_and_never_split_a_user(tmp_path, fmt):
    rows = _rows()
    # a quoted newline, blank lines and a whitespace-only line: records are not one per line
    rows[10]["page_title"] = "two\nlines"
    extra = {5: "", 40: "   " if fmt.startswith("jsonl") else ""}
    if fmt.startswith("csv"):
        path = _csv(tmp_path / f"e.{fmt}", rows, extra=extra)
    elif fmt.startswith("jsonl"):
        path = _jsonl(tmp_path / f"e.{fmt}", rows, extra=extra)
    else:  # a folder: one stream in sorted file order, user u010 straddling the two files
        path = tmp_path / "logs"
        path.mkdir()
        _csv(path / "a.csv", rows[:75], extra=extra)
        _jsonl(path / "b.jsonl", rows[75:])
    whole, _ = read_events(path)
    parts = list(sio.stream_events(path, batch_rows=10, block_bytes=256))  # blocks of a few rows: users straddle them
    assert len(parts) >= 10 and all(p["user_id"].nunique() <= 3 for p in parts), "memory: a few users per table"
    assert sum(p["user_id"].nunique() for p in parts) == 30, "every user whole in exactly one table"
    got = pd.concat(parts, ignore_index=True)
    pd.testing.assert_frame_equal(got.drop(columns=["_file", "_line"]), whole)
    # _line: JSONL the physical line; CSV the record index + 2 (pyarrow knows no lines; error messages give
    # physical lines, see below)
    index_of = {(r["user_id"], r["page"]): i for i, r in enumerate(rows)}
    if fmt in ("csv", "jsonl"):
        for u, page, line in zip(got["user_id"], got["page"], got["_line"]):
            i = index_of[(u, page)]
            assert line == (i + 2 if fmt == "csv" else i + 1 + sum(1 for k in extra if k <= i)), (u, page, line)


def test_csv_read_in_blocks_is_never_read_in_python_when_clean(tmp_path, monkeypatch):
    """A clean CSV goes through pyarrow's streaming reader only (the line-by-line pass is for error messages)."""
    path = _csv(tmp_path / "e.csv", _rows())

    def no(*a, **k):
        raise AssertionError("the line-by-line pass ran on a clean file")

    monkeypatch.setattr(sio, "_csv_records", no)
    assert sum(len(t) for t in sio.stream_events(path, batch_rows=10, block_bytes=256)) == len(_rows())


# ---- bad rows: the same file:line: reason as read_events --------------------------------------------------------


def _good(i: int) -> str:
    return f"u{i},s{i},2023-03-01T10:00:{i:02d}Z,ec2,/p{i}"


def _jgood(i: int, **kw) -> str:
    return json.dumps({"user_id": f"u{i}", "session_id": f"s{i}", "timestamp": 1677664800 + i, "service": "a",
                       "page": "/", **kw})


MALFORMED = {
    "truncated.csv": "\n".join([MIN_HEADER, _good(1), _good(2), "u3,s3,2023-03-01T1"]),
    "truncated.jsonl": _jgood(1) + '\n{"user_id": "u", "session_id": "s", "timest',
    "fields.csv": "\n".join([MIN_HEADER, _good(1), _good(2) + ",extra", _good(3)]) + "\n",
    "json.jsonl": "\n".join([_jgood(1), "", '{"user_id": "u", "session_id": "s" "timestamp": 1}',
                             '["not", "an", "object"]']) + "\n",
    "missing.csv": "\n".join([MIN_HEADER, _good(1), "u2,s2,2023-03-01T10:00:00Z,ec2,",
                              "u3,,2023-03-01T10:00:00Z,ec2,/p", "u4,s4,  ,ec2,/p"]) + "\n",
    "missing.jsonl": "\n".join([_jgood(1), _jgood(2, user_id=None),
                                json.dumps({"session_id": "s", "timestamp": 1677664802, "service": "a", "page": "/"})]),
    "type.jsonl": "\n".join([_jgood(1), _jgood(2, page={"path": "/x"}), _jgood(3, service=["a"]),
                             _jgood(4, timestamp=True), _jgood(5, user_id=42)]) + "\n",
    "type.csv": "\n".join([MIN_HEADER, _good(1), "u,s,yesterday,ec2,/p"]) + "\n",
    "timestamp.csv": "\n".join([MIN_HEADER, _good(1), "u,s,2023-02-30T10:00:00Z,ec2,/a",
                                "u,s,1850-01-01T00:00:00Z,ec2,/b", "u,s,3000-01-01,ec2,/c", "u,s,99999999999999,ec2,/d",
                                "u,s,86400,ec2,/e"]) + "\n",
    "session.jsonl": "\n".join([_jgood(1), json.dumps({"user_id": "u", "session_id": "s2", "timestamp": 1677664900})]),
    "duplicate.csv": "\n".join([MIN_HEADER, _good(1), "u,s,2023-03-01T10:00:00Z,ec2,/a", "u,s,1677664800,ec2,/a",
                                _good(2)]) + "\n",
    "quoted.csv": "\n".join([MIN_HEADER + ",page_title", _good(1) + ',"two', 'lines"', "",
                             "u,s,2023-03-01T10:00:00Z,ec2,,t"]) + "\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_bad_rows_are_reported_as_read_events_reports_them(tmp_path, name):
    path = tmp_path / name
    path.write_text(MALFORMED[name])
    with pytest.raises(BadInputError) as exc:
        read_events(path, max_errors_shown=10)
    expected = _problems(str(exc.value))
    assert len(expected) >= 2 and f"{path}:" in expected[1]
    got, _ = _stream_error(path, max_errors_shown=10)
    assert _problems(got) == expected


def test_invalid_utf8_is_reported_as_read_events_reports_it(tmp_path):
    path = tmp_path / "u.csv"
    path.write_bytes((MIN_HEADER + "\n" + _good(1) + "\n").encode() + b"u2,s2,2023-03-01T10:00:00Z,ec2,/caf\xe9\n"
                     + (_good(3) + "\n").encode())
    jpath = tmp_path / "u.jsonl"
    jpath.write_bytes((_jgood(1) + "\n").encode() + b'{"user_id": "\xff", "session_id": "s", "timestamp": 1677664801, '
                      b'"service": "a", "page": "/"}\n')
    for p in (path, jpath):
        with pytest.raises(BadInputError) as exc:
            read_events(p)
        assert "invalid UTF-8" in str(exc.value)
        assert _problems(_stream_error(p)[0]) == _problems(str(exc.value))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bad_value_late_in_a_big_file_names_its_line(tmp_path, fmt):
    """Blocks before the bad one are streamed out first; the error names the file and the physical line (a blank
    line and, in the CSV, a quoted newline come before it)."""
    rows = _rows(40)
    rows[20]["page_title"] = "two\nlines"
    bad = 250
    rows[bad]["timestamp"] = "2023-02-30T10:00:00Z"
    extra = {3: ""}
    path = _csv(tmp_path / "late.csv", rows, extra=extra) if fmt == "csv" else \
        _jsonl(tmp_path / "late.jsonl", rows, extra=extra)
    line = bad + 1 + 1 + (2 if fmt == "csv" else 0)  # 1-based, the blank line, (CSV) the header and the quoted newline
    with pytest.raises(BadInputError) as exc:
        read_events(path)
    assert f"{path}:{line}: bad timestamp: cannot parse '2023-02-30T10:00:00Z'" in str(exc.value)
    msg, before = _stream_error(path, batch_rows=20, block_bytes=512)
    assert before >= 5, "the rows before the bad block were streamed"
    assert _problems(msg) == _problems(str(exc.value))
    # and a wrong number of fields late in a CSV (pyarrow's reader fails; the line-by-line pass names the line)
    if fmt == "csv":
        text = path.read_text().splitlines()
        text[line - 1] += ",extra"
        path.write_text("\n".join(text) + "\n")
        msg, before = _stream_error(path, batch_rows=20, block_bytes=512)
        assert before >= 5
        assert f"{path}:{line}: wrong number of fields: expected 8 fields, got 9" in msg


# ---- users must be grouped ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("block_bytes", [300, 1 << 20])  # the user found again in a later block / in the same block
def test_user_found_twice_is_reported_with_its_line(tmp_path, fmt, block_bytes):
    rows = _rows(12, 4)
    rows[5]["page_title"] = "two\nlines"
    again = dict(rows[0], session_id="late", timestamp="2023-04-01T00:00:00Z")
    rows = rows[:30] + [again] + rows[30:]  # u000 again at row 30, after u007's first rows
    extra = {2: ""}
    path = _csv(tmp_path / "g.csv", rows, extra=extra) if fmt == "csv" else \
        _jsonl(tmp_path / "g.jsonl", rows, extra=extra)
    line = 30 + 1 + 1 + (2 if fmt == "csv" else 0)
    msg, _ = _stream_error(path, batch_rows=6, block_bytes=block_bytes)
    assert msg.startswith(f"{path}:{line}: user 'u000' reappears after its rows ended"), msg
    read_events(path)  # read whole, the file is fine


def test_user_found_again_in_a_later_file_of_a_folder_names_that_file(tmp_path):
    rows = _rows(6, 3)
    d = tmp_path / "logs"
    d.mkdir()
    _csv(d / "a.csv", rows[:9])
    b = _jsonl(d / "b.jsonl", rows[9:] + [dict(rows[0], session_id="late")])
    msg, _ = _stream_error(d, batch_rows=4, block_bytes=200)
    assert msg.startswith(f"{b}:10: user 'u000' reappears"), msg


def test_duplicate_events_straddling_blocks_are_found(tmp_path):
    rows = _rows(10, 6)
    rows.insert(40, dict(rows[36], page_title="copy"))  # u006: a later copy of its first event, 4 rows on
    path = _csv(tmp_path / "d.csv", rows)
    msg, _ = _stream_error(path, batch_rows=4, block_bytes=300)
    assert (f"{path}:42: duplicate event: same user_id, session_id, timestamp, service, page as {path}:38") in msg
    with pytest.raises(BadInputError, match=rf"{path}:42: duplicate event"):
        read_events(path)
