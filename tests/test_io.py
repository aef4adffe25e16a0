"""Reading users' own session logs: formats, timestamps, every kind of bad row, skip mode, atomic writes."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sessionbert.data import io as sio
from sessionbert.data.io import BadInputError, read_billing, read_events, write_parquet_atomic
from sessionbert.data.schema import EVENT_SCHEMA

HEADER = "user_id,session_id,timestamp,service,page,page_title,action,region"

# Eight good events; session s1 is out of time order in the file (rows 2 and 3).
GOOD_ROWS = [
    {"user_id": "u1", "session_id": "s1", "timestamp": "2023-03-01T10:00:00Z", "service": "ec2", "page": "/home",
     "page_title": "EC2 Dashboard", "action": None, "region": "us-east-1"},
    {"user_id": "u1", "session_id": "s1", "timestamp": "2023-03-01T10:02:00Z", "service": "ec2", "page": "/instances",
     "page_title": "Instances", "action": "launch", "region": "us-east-1"},
    {"user_id": "u1", "session_id": "s1", "timestamp": "2023-03-01T10:01:00Z", "service": "s3", "page": "/buckets",
     "page_title": "Buckets, all", "action": None, "region": None},
    {"user_id": "u1", "session_id": "s2", "timestamp": "2023-03-02T08:00:00.250Z", "service": "iam", "page": "/users",
     "page_title": None, "action": None, "region": None},
    {"user_id": "007", "session_id": "s3", "timestamp": "2023-03-01T09:00:00Z", "service": "ec2", "page": "/home",
     "page_title": None, "action": None, "region": "eu-west-1"},
    {"user_id": "007", "session_id": "s3", "timestamp": "2023-03-01T09:00:30Z", "service": "lambda", "page": "/fns",
     "page_title": "Functions", "action": "create", "region": "eu-west-1"},
    {"user_id": "u2", "session_id": "s4", "timestamp": "2023-03-03T00:00:00Z", "service": "rds", "page": "/db",
     "page_title": None, "action": None, "region": None},
    {"user_id": "u2", "session_id": "s4", "timestamp": "2023-03-03T00:00:01Z", "service": "rds", "page": "/db/new",
     "page_title": None, "action": None, "region": None},
]


def _write_csv(path: Path, rows: list[dict], header: str = HEADER) -> Path:
    cols = header.split(",")

    def cell(v):
        if v is None:
            return ""
        v = str(v)
        return f'"{v}"' if "," in v else v

    path.write_text(header + "\n" + "".join(",".join(cell(r.get(c)) for c in cols) + "\n" for r in rows))
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _csv_lines(path: Path, lines: list[str]) -> Path:
    """A CSV file from raw text lines (the header first); line N of the list is line N of the file."""
    path.write_text("\n".join(lines) + "\n")
    return path


def _good_csv_line(i: int) -> str:
    return f"u{i},s{i},2023-03-01T10:00:{i:02d}Z,ec2,/p{i}"


MIN_HEADER = "user_id,session_id,timestamp,service,page"


def _error_of(path: Path, **kw) -> str:
    with pytest.raises(BadInputError) as exc:
        read_events(path, **kw)
    return str(exc.value)


# ---- round trips and output contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "csv.gz", "jsonl.gz", "dir"])
def test_round_trip_each_format_gives_identical_dataframes(tmp_path, fmt):
    reference, _ = read_events(_write_parquet(tmp_path / "ref.parquet", GOOD_ROWS))
    if fmt == "parquet":
        path = _write_parquet(tmp_path / "e.parquet", GOOD_ROWS)
    elif fmt == "csv":
        path = _write_csv(tmp_path / "e.csv", GOOD_ROWS)
    elif fmt == "jsonl":
        path = _write_jsonl(tmp_path / "e.jsonl", GOOD_ROWS)
    elif fmt == "csv.gz":
        path = tmp_path / "e.csv.gz"
        path.write_bytes(gzip.compress(_write_csv(tmp_path / "tmp.csv", GOOD_ROWS).read_bytes()))
    elif fmt == "jsonl.gz":
        path = tmp_path / "e.jsonl.gz"
        path.write_bytes(gzip.compress(_write_jsonl(tmp_path / "tmp.jsonl", GOOD_ROWS).read_bytes()))
    else:  # a directory mixing all three formats, split across files
        path = tmp_path / "logs"
        path.mkdir()
        _write_csv(path / "a.csv", GOOD_ROWS[:3])
        _write_jsonl(path / "b.jsonl", GOOD_ROWS[3:5])
        _write_parquet(path / "c.parquet", GOOD_ROWS[5:])
    df, report = read_events(path)
    pd.testing.assert_frame_equal(df, reference)
    assert report.rows_read == report.rows_kept == len(GOOD_ROWS)
    assert report.rows_rejected == 0


def test_output_has_exact_schema_columns_types_and_sort_order(tmp_path):
    df, _ = read_events(_write_csv(tmp_path / "e.csv", GOOD_ROWS))
    assert list(df.columns) == EVENT_SCHEMA.names
    assert str(df["timestamp"].dtype) == "datetime64[ms, UTC]"
    assert df["user_id"].tolist()[:2] == ["007", "007"]  # ids stay text: leading zeros kept
    assert df.loc[df["page"] == "/buckets", "page_title"].item() == "Buckets, all"  # quoted comma
    assert df["action"].isna().sum() == 6  # empty optional fields are missing, not ""
    keys = list(zip(df["user_id"], df["session_id"], df["timestamp"]))
    assert keys == sorted(keys)
    # Optional columns absent from the file come back all-missing.
    slim, _ = read_events(_write_csv(tmp_path / "slim.csv", GOOD_ROWS, header=MIN_HEADER))
    assert list(slim.columns) == EVENT_SCHEMA.names
    assert slim["region"].isna().all()


def test_sort_is_stable_for_equal_timestamps(tmp_path):
    path = _csv_lines(tmp_path / "e.csv", [MIN_HEADER, "u,s,1677664800,b,/2", "u,s,1677664800,a,/1",
                                           "u,s,1677664800,c,/3"])
    df, report = read_events(path)
    assert df["page"].tolist() == ["/2", "/1", "/3"]  # file order kept among ties
    assert report.sessions_reordered == 0


def test_epoch_seconds_epoch_ms_and_iso_offsets_parse_to_same_utc_instant(tmp_path):
    instant = pd.Timestamp("2023-03-01T10:00:00.500Z")
    forms = ["1677664800.5", "1677664800500", "2023-03-01T10:00:00.500Z", "2023-03-01T10:00:00.500+00:00",
             "2023-03-01T15:30:00.500+05:30", "2023-03-01T05:00:00.500-05:00", "2023-03-01 10:00:00.500"]
    lines = [MIN_HEADER] + [f"u,s{i},{t},ec2,/p" for i, t in enumerate(forms)]
    df, _ = read_events(_csv_lines(tmp_path / "t.csv", lines))
    assert (df["timestamp"] == instant).all(), df["timestamp"].tolist()
    # The same from JSON numbers (int and float) and strings, mixed in one file.
    rows = [{"user_id": "u", "session_id": f"s{i}", "timestamp": t, "service": "ec2", "page": "/p"}
            for i, t in enumerate([1677664800.5, 1677664800500, "2023-03-01T15:30:00.500+05:30"])]
    dj, _ = read_events(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert (dj["timestamp"] == instant).all(), dj["timestamp"].tolist()


# ---- malformed input: one test per case, each naming file:line and the reason ----------------------------------


def test_malformed_truncated_line_names_file_and_line(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_text(MIN_HEADER + "\n" + _good_csv_line(1) + "\n" + _good_csv_line(2) + "\nu3,s3,2023-03-01T1")
    msg = _error_of(path)
    assert f"{path}:4: truncated line: expected 5 fields, got 3" in msg
    assert "1 bad row(s)" in msg

    jpath = tmp_path / "cut.jsonl"
    jpath.write_text('{"user_id": "u", "session_id": "s", "timestamp": 1677664800, "service": "a", "page": "/"}\n'
                     '{"user_id": "u", "session_id": "s", "timest')
    assert f"{jpath}:2: truncated line: the JSON record is incomplete" in _error_of(jpath)


def test_malformed_wrong_number_of_csv_fields_names_file_and_line(tmp_path):
    path = _csv_lines(tmp_path / "f.csv", [MIN_HEADER, _good_csv_line(1), _good_csv_line(2) + ",extra",
                                           _good_csv_line(3)])
    assert f"{path}:3: wrong number of fields: expected 5 fields, got 6" in _error_of(path)


def test_malformed_unparseable_json_names_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"user_id": "u", "session_id": "s", "timestamp": 1677664800, "service": "a", "page": "/"}\n'
                    '\n'
                    '{"user_id": "u", "session_id": "s" "timestamp": 1}\n'
                    '["not", "an", "object"]\n')
    msg = _error_of(path)
    assert f"{path}:3: unparseable JSON: Expecting ',' delimiter" in msg  # blank line 2 still counts as a line
    assert f"{path}:4: not a JSON object: got a JSON array" in msg


def test_malformed_missing_field_names_file_and_line(tmp_path):
    path = _csv_lines(tmp_path / "m.csv", [MIN_HEADER, _good_csv_line(1), "u2,s2,2023-03-01T10:00:00Z,ec2,",
                                           "u3,,2023-03-01T10:00:00Z,ec2,/p", "u4,s4,  ,ec2,/p"])
    msg = _error_of(path)
    assert f"{path}:3: missing required field: page" in msg  # empty string
    assert f"{path}:4: missing required field: session_id" in msg
    assert f"{path}:5: missing required field: timestamp" in msg  # whitespace only
    jpath = _write_jsonl(tmp_path / "m.jsonl", [
        {"user_id": "u", "session_id": "s", "timestamp": 1677664800, "service": "a", "page": "/"},
        {"user_id": None, "session_id": "s", "timestamp": 1677664801, "service": "a", "page": "/"},
        {"session_id": "s", "timestamp": 1677664802, "service": "a", "page": "/"},
    ])
    jmsg = _error_of(jpath)
    assert f"{jpath}:2: missing required field: user_id" in jmsg  # null
    assert f"{jpath}:3: missing required field: user_id" in jmsg  # absent key


def test_malformed_wrong_type_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "w.jsonl", [
        {"user_id": "u", "session_id": "s", "timestamp": 1677664800, "service": "a", "page": "/"},
        {"user_id": "u", "session_id": "s", "timestamp": 1677664801, "service": "a", "page": {"path": "/x"}},
        {"user_id": "u", "session_id": "s", "timestamp": 1677664802, "service": ["a"], "page": "/"},
        {"user_id": "u", "session_id": "s", "timestamp": True, "service": "a", "page": "/"},
        {"user_id": 42, "session_id": "s", "timestamp": 1677664803, "service": "a", "page": "/"},  # numeric id: ok
    ])
    msg = _error_of(path)
    assert f'{path}:2: wrong type: page must be a string, got object {{"path": "/x"}}' in msg
    assert f"{path}:3: wrong type: service must be a string, got array" in msg
    assert f"{path}:4: wrong type: timestamp must be an ISO 8601 string or an epoch" in msg
    assert "3 bad row(s)" in msg
    cpath = _csv_lines(tmp_path / "w.csv", [MIN_HEADER, _good_csv_line(1), "u,s,yesterday,ec2,/p"])
    assert (f"{cpath}:3: wrong type: timestamp must be an ISO 8601 string or an epoch seconds/milliseconds "
            f"number, got 'yesterday'") in _error_of(cpath)


def test_malformed_bad_timestamp_names_file_and_line(tmp_path):
    path = _csv_lines(tmp_path / "t.csv", [MIN_HEADER, _good_csv_line(1), "u,s,2023-02-30T10:00:00Z,ec2,/a",
                                           "u,s,1850-01-01T00:00:00Z,ec2,/b", "u,s,3000-01-01,ec2,/c",
                                           "u,s,99999999999999,ec2,/d", "u,s,86400,ec2,/e"])
    msg = _error_of(path, max_errors_shown=10)
    assert f"{path}:3: bad timestamp: cannot parse '2023-02-30T10:00:00Z'" in msg
    assert f"{path}:4: bad timestamp: '1850-01-01T00:00:00Z' is outside 1990..2100" in msg
    assert f"{path}:5: bad timestamp: '3000-01-01' is outside 1990..2100" in msg
    assert f"{path}:6: bad timestamp: '99999999999999' (read as epoch milliseconds) is outside 1990..2100" in msg
    assert f"{path}:7: bad timestamp: '86400' (read as epoch seconds) is outside 1990..2100" in msg


def test_malformed_invalid_utf8_names_file_line_and_byte_offset(tmp_path):
    path = tmp_path / "u.csv"
    head = (MIN_HEADER + "\n" + _good_csv_line(1) + "\n").encode()
    path.write_bytes(head + b"u2,s2,2023-03-01T10:00:00Z,ec2,/caf\xe9\n" + (_good_csv_line(3) + "\n").encode())
    offset = len(head) + len(b"u2,s2,2023-03-01T10:00:00Z,ec2,/caf")
    msg = _error_of(path)
    assert f"{path}:3: invalid UTF-8: byte 0xe9 at line 3, column 36 (byte offset {offset})" in msg
    jpath = tmp_path / "u.jsonl"
    jpath.write_bytes(b'{"user_id": "u", "session_id": "s", "timestamp": 1677664800, "service": "a", "page": "/"}\n'
                      b'{"user_id": "\xff", "session_id": "s", "timestamp": 1677664801, "service": "a", "page": "/"}\n')
    assert f"{jpath}:2: invalid UTF-8: byte 0xff" in _error_of(jpath)


def test_malformed_empty_session_is_reported_as_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "e.jsonl", [
        {"user_id": "u", "session_id": "s1", "timestamp": 1677664800, "service": "ec2", "page": "/"},
        {"user_id": "u", "session_id": "s2", "timestamp": 1677664900},  # a session with no page event
    ])
    msg = _error_of(path)
    assert f"{path}:2: missing required field: service, page (a session record with no page event)" in msg


def test_malformed_duplicate_event_rejects_the_later_copy(tmp_path):
    # Same instant written two ways is still the same event.
    path = _csv_lines(tmp_path / "d.csv", [MIN_HEADER, "u,s,2023-03-01T10:00:00Z,ec2,/a", _good_csv_line(2),
                                           "u,s,1677664800,ec2,/a"])
    msg = _error_of(path)
    assert (f"{path}:4: duplicate event: same user_id, session_id, timestamp, service, page as {path}:2") in msg
    assert "1 bad row(s)" in msg


def test_duplicate_event_across_files_names_both_files(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    first = _write_parquet(d / "a.parquet", GOOD_ROWS[:2])
    second = _write_jsonl(d / "b.jsonl", [GOOD_ROWS[4], GOOD_ROWS[1]])
    msg = _error_of(d)
    assert f"{second}:2: duplicate event: same user_id, session_id, timestamp, service, page as {first}:row 2" in msg


def test_unknown_columns_are_dropped_reported_and_logged(tmp_path, caplog):
    path = _csv_lines(tmp_path / "x.csv", [MIN_HEADER + ",browser,ip", _good_csv_line(1) + ",firefox,10.0.0.1"])
    with caplog.at_level(logging.WARNING, logger="sessionbert.data"):
        df, report = read_events(path)
    assert report.unknown_columns == ["browser", "ip"]
    assert list(df.columns) == EVENT_SCHEMA.names
    assert any("browser, ip" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_out_of_order_timestamps_are_sorted_counted_and_logged_not_rejected(tmp_path, caplog):
    path = _write_csv(tmp_path / "o.csv", GOOD_ROWS)  # session (u1, s1) is out of order in the file
    with caplog.at_level(logging.INFO, logger="sessionbert.data"):
        df, report = read_events(path)
    assert report.rows_rejected == 0
    assert report.sessions_reordered == 1
    s1 = df[df["session_id"] == "s1"]
    assert s1["page"].tolist() == ["/home", "/buckets", "/instances"]
    assert any("1 session(s) had events out of time order" in r.getMessage() for r in caplog.records)


def test_parquet_bad_rows_are_reported_by_row_number(tmp_path):
    rows = [dict(GOOD_ROWS[0]), dict(GOOD_ROWS[1], page=""), dict(GOOD_ROWS[2], timestamp="not a time")]
    path = _write_parquet(tmp_path / "p.parquet", rows)
    msg = _error_of(path)
    assert f"{path}:row 2: missing required field: page" in msg
    assert f"{path}:row 3: wrong type: timestamp must be" in msg


def test_error_message_shows_first_n_problems_and_total_count(tmp_path):
    lines = [MIN_HEADER] + [f"u,s{i},2023-03-01T10:00:00Z,ec2," for i in range(12)]
    path = _csv_lines(tmp_path / "many.csv", lines)
    msg = _error_of(path, max_errors_shown=3)
    assert "12 bad row(s) in 1 file(s) (missing required field: 12)" in msg
    assert f"{path}:4: missing required field: page" in msg
    assert f"{path}:5:" not in msg
    assert "... and 9 more" in msg


def test_quoted_newline_keeps_later_line_numbers_physical(tmp_path):
    path = _csv_lines(tmp_path / "q.csv", [MIN_HEADER + ",page_title", _good_csv_line(1) + ',"two', 'lines"',
                                           "u,s,2023-03-01T10:00:00Z,ec2,,t"])
    assert f"{path}:4: missing required field: page" in _error_of(path)


# ---- file-level errors -----------------------------------------------------------------------------------------


def test_missing_path_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_events(tmp_path / "nope.csv")


def test_unsupported_suffix_names_file_and_supported_formats(tmp_path):
    path = tmp_path / "events.xlsx"
    path.write_text("whatever")
    with pytest.raises(BadInputError, match=r"events\.xlsx: unsupported file type; supported formats: \.parquet"):
        read_events(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_missing_required_column_names_file_and_column(tmp_path, fmt):
    rows = [{k: v for k, v in r.items() if k != "page"} for r in GOOD_ROWS[:2]]
    writer = {"csv": lambda p: _write_csv(p, rows, header="user_id,session_id,timestamp,service"),
              "jsonl": lambda p: _write_jsonl(p, rows), "parquet": lambda p: _write_parquet(p, rows)}[fmt]
    path = writer(tmp_path / f"nopage.{fmt}")
    with pytest.raises(BadInputError, match=rf"nopage\.{fmt}: missing required column\(s\) page"):
        read_events(path)


def test_json_array_file_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(GOOD_ROWS))
    with pytest.raises(BadInputError, match="JSON array; expected JSON Lines"):
        read_events(path)


# ---- skip mode ---------------------------------------------------------------------------------------------------


def _mixed_file(tmp_path: Path) -> Path:
    """100 data rows, 3 of them bad (lines 5, 20 and 60)."""
    lines = [MIN_HEADER] + [_good_csv_line(i % 60) .replace(f"u{i % 60},", f"u{i},") for i in range(100)]
    lines[4] = "u,s,2023-03-01T10:00:00Z,ec2"  # wrong number of fields
    lines[19] = "u,s,tomorrow,ec2,/p"  # wrong type
    lines[59] = lines[10]  # duplicate of line 11
    return _csv_lines(tmp_path / "mixed.csv", lines)


def test_skip_mode_writes_rejects_file_and_counts_add_up(tmp_path, caplog):
    path = _mixed_file(tmp_path)
    rejects = tmp_path / "out" / "rejects.csv"
    with caplog.at_level(logging.WARNING, logger="sessionbert.data"):
        df, report = read_events(path, on_bad_rows="skip", max_bad_fraction=0.05, rejects_path=rejects)
    assert report.rows_read == 100
    assert report.rows_kept == len(df) == 97
    assert report.rows_read == report.rows_kept + report.rows_rejected
    assert report.reasons == {"wrong number of fields": 1, "wrong type": 1, "duplicate event": 1}
    assert report.rejects_path == str(rejects)
    rej = pd.read_csv(rejects)
    assert list(rej.columns) == ["file", "line", "reason", "excerpt"]
    assert rej["line"].tolist() == [5, 20, 60]
    assert (rej["file"] == str(path)).all()
    assert rej["reason"].str.split(":").str[0].tolist() == ["wrong number of fields", "wrong type", "duplicate event"]
    assert rej["excerpt"].tolist()[:2] == ["u,s,2023-03-01T10:00:00Z,ec2", "u,s,tomorrow,ec2,/p"]
    assert any("rejected 3 of 100 rows" in r.getMessage() for r in caplog.records)


def test_skip_mode_default_rejects_file_is_in_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, report = read_events(_mixed_file(tmp_path), on_bad_rows="skip", max_bad_fraction=0.5)
    assert (tmp_path / "rejects.csv").exists()
    assert Path(report.rejects_path) == tmp_path / "rejects.csv"


def test_skip_mode_parquet_rejects_file(tmp_path):
    rejects = tmp_path / "rejects.parquet"
    read_events(_mixed_file(tmp_path), on_bad_rows="skip", max_bad_fraction=0.5, rejects_path=rejects)
    rej = pd.read_parquet(rejects)
    assert rej["line"].tolist() == [5, 20, 60]


def test_max_bad_fraction_aborts_after_writing_rejects(tmp_path):
    rejects = tmp_path / "rejects.csv"
    with pytest.raises(BadInputError) as exc:
        read_events(_mixed_file(tmp_path), on_bad_rows="skip", max_bad_fraction=0.01, rejects_path=rejects)
    msg = str(exc.value)
    assert "3 of 100 rows are bad (3.00%), more than max_bad_fraction=1.00%" in msg
    assert str(rejects) in msg
    assert len(pd.read_csv(rejects)) == 3


def test_on_bad_rows_must_be_error_or_skip(tmp_path):
    with pytest.raises(ValueError, match="on_bad_rows"):
        read_events(_write_csv(tmp_path / "e.csv", GOOD_ROWS), on_bad_rows="ignore")


def test_report_to_dict_is_json_serialisable(tmp_path):
    _, report = read_events(_write_csv(tmp_path / "e.csv", GOOD_ROWS))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["rows_read"] == len(GOOD_ROWS) and d["files"] == [str(tmp_path / "e.csv")]


# ---- billing -----------------------------------------------------------------------------------------------------


def test_read_billing_validates_month_and_spend(tmp_path):
    path = _csv_lines(tmp_path / "b.csv", ["user_id,month,service,spend_usd", "u1,2023-03,ec2,12.5",
                                           "u1,2023-13,ec2,1", "u1,2023-04,ec2,-3", "u1,2023-05,ec2,lots",
                                           "u1,2023-03,ec2,7"])
    with pytest.raises(BadInputError) as exc:
        read_billing(path)
    msg = str(exc.value)
    assert f"{path}:3: bad month: month must be 'YYYY-MM', got '2023-13'" in msg
    assert f"{path}:4: bad spend: spend_usd must be a non-negative number" in msg
    assert f"{path}:5: wrong type: spend_usd must be a number, got 'lots'" in msg
    assert f"{path}:6: duplicate billing row: same user_id, month, service as {path}:2" in msg
    good, report = read_billing(_csv_lines(tmp_path / "ok.csv", ["user_id,month,service,spend_usd",
                                                                 "u2,2023-04,s3,0", "u1,2023-03,ec2,12.5"]))
    assert good["user_id"].tolist() == ["u1", "u2"]
    assert good["spend_usd"].tolist() == [12.5, 0.0]
    assert str(good["spend_usd"].dtype) == "float64"


# ---- atomic write ------------------------------------------------------------------------------------------------


def test_write_parquet_atomic_writes_schema_and_leaves_no_temp_files(tmp_path):
    df, _ = read_events(_write_csv(tmp_path / "e.csv", GOOD_ROWS))
    out = write_parquet_atomic(df, tmp_path / "out" / "events.parquet", schema=EVENT_SCHEMA)
    assert pq.read_schema(out).remove_metadata().equals(EVENT_SCHEMA)
    back, _ = read_events(out)
    pd.testing.assert_frame_equal(back, df)
    assert sorted(p.name for p in out.parent.iterdir()) == ["events.parquet"]


def test_atomic_write_keeps_previous_file_loadable_when_write_fails_midway(tmp_path, monkeypatch):
    target = tmp_path / "events.parquet"
    old = pa.Table.from_pylist(GOOD_ROWS[:2])
    write_parquet_atomic(old, target)

    def crash_midway(table, where, **kw):
        where.write(b"PAR1 half a file")  # some bytes reach the temp file, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(sio.pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(pa.Table.from_pylist(GOOD_ROWS), target)
    monkeypatch.undo()
    assert pq.read_table(target).equals(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet"]  # the temp file was removed


# ---- streaming a Parquet file by user (the `sessionbert recommend` input path) ---------------------------------
def _many_users(n_users: int = 40, per_user: int = 5) -> list[dict]:
    rows = []
    for u in range(n_users):
        for j in range(per_user):
            rows.append({"user_id": f"u{u:03d}", "session_id": f"s{u}-{j // 3}",
                         "timestamp": f"2023-03-{1 + j:02d}T10:00:00Z", "service": "ec2", "page": f"/p{j}",
                         "page_title": None, "action": None, "region": None})
    return rows


def test_stream_events_by_user_equals_read_events_in_bounded_batches(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_pylist(_many_users()), path, row_group_size=7)
    whole, _ = read_events(path)
    parts = list(sio.iter_events_by_user(path, batch_users=6, batch_rows=9))
    assert len(parts) >= 6 and all(p["user_id"].nunique() <= 6 + 2 for p in parts), "memory: a few users per batch"
    assert sum(p["user_id"].nunique() for p in parts) == 40, "every user whole in exactly one batch"
    got = pd.concat(parts, ignore_index=True)
    pd.testing.assert_frame_equal(got.sort_values(["user_id", "session_id", "timestamp"]).reset_index(drop=True),
                                  whole.reset_index(drop=True))


def test_stream_events_by_user_rejects_ungrouped_and_bad_rows_naming_the_row(tmp_path):
    rows = _many_users(6, 3)
    ungrouped = rows[:3] + rows[6:9] + rows[3:6] + rows[9:] + rows[:1][:0]
    ungrouped = ungrouped[:9] + [dict(rows[0], session_id="late", timestamp="2023-04-01T00:00:00Z")] + ungrouped[9:]
    path = tmp_path / "ungrouped.parquet"
    pq.write_table(pa.Table.from_pylist(ungrouped), path)
    with pytest.raises(BadInputError, match=r"ungrouped\.parquet:row 10: user 'u000' reappears"):
        list(sio.iter_events_by_user(path, batch_users=1, batch_rows=4))
    bad = [dict(r) for r in rows]
    bad[7]["timestamp"] = "not a time"
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(bad), path)
    with pytest.raises(BadInputError, match=r"bad\.parquet:row 8: .*timestamp"):
        list(sio.iter_events_by_user(path, batch_users=2, batch_rows=4))
