"""The `sessionbert` command: score session logs with a trained run, or export its model.

    sessionbert recommend --run DIR --events FILE --out FILE [--billing FILE] [--cutoff TS] [--batch-rows N]
    sessionbert export --run DIR --out DIR [--onnx]

`recommend` reads Parquet / CSV / JSONL (a file or a folder), validated as `sessionbert.data.io.read_events`
validates, so a malformed row stops it with `file:line: reason`; writes Parquet (`.parquet`) or JSON lines
(`.jsonl`) with one row per user (columns of `sessionbert.inference.COLUMNS`; users not scored have
`skipped_reason` set), batch by batch. Every input is streamed in batches of whole users of about `--batch-rows`
rows, so memory holds a few batches, never the input (`SessionBERT.recommend_file`): a single Parquet file (with a
Parquet billing file or none) in splits of whole row groups, which `--workers` processes read, validate, serialise
and tokenise while this process runs the model; CSV / JSONL files and folders in blocks that this process reads
with pyarrow and validates (`io.stream_events`, a user straddling two blocks carried whole into the next batch)
while the `--workers` serialise and tokenise. The input must hold each user's rows together (e.g. sorted by
user_id); `--no-stream` reads it whole instead and scores `--batch-users` users at a time. A CSV / JSONL billing
file is read whole (a Parquet one is read per batch for its users). Uses the GPU when there is one. Services,
pages and actions never seen in training are tokenised by the run's WordPiece tokenizer exactly as in training
(pieces outside its vocabulary -> [UNK]).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path


def _writer(path: Path):
    """(write(table), close()) for `path` by suffix, through a temp file renamed at the end; tables are
    `sessionbert.inference.OUTPUT_SCHEMA` Arrow tables."""
    import pyarrow as pa

    from .inference import OUTPUT_SCHEMA

    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise SystemExit(f"sessionbert: --out must end in .parquet or .jsonl, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        w = pq.ParquetWriter(str(tmp), OUTPUT_SCHEMA)

        def write(t: pa.Table):
            w.write_table(t.cast(OUTPUT_SCHEMA))

        def close():
            w.close()
            os.replace(tmp, path)
    else:
        fh = open(tmp, "w", encoding="utf-8")

        def write(t: pa.Table):
            for rec in t.to_pylist():  # Arrow nulls are None; NaN similarity of skipped users is null already
                fh.write(json.dumps(rec, default=str) + "\n")

        def close():
            fh.close()
            os.replace(tmp, path)
    return write, close


def _progress(total: int | None):
    """A rich progress bar on stderr when it is a terminal, else a no-op: (advance(n), stop())."""
    if not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("scoring users"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 console=Console(stderr=True))
    task = p.add_task("users", total=total)
    p.start()
    return (lambda n: p.advance(task, n)), p.stop


def _tables(a: argparse.Namespace, model):
    """Output tables per batch of users, and the number of users (None when streaming: not known ahead).

    Streamed by `SessionBERT.recommend_file` (a Parquet file in splits of row groups, CSV / JSONL / folders in
    blocks; the input grouped by user); with `--no-stream`, read whole (`io.read_events`) and scored
    `--batch-users` users at a time."""
    from .data.io import read_billing, read_events
    from .inference import iter_user_batches

    cutoff = a.cutoff or None
    if not a.no_stream:
        workers = a.workers if a.workers >= 0 else _auto_workers(model)
        return model.recommend_file(Path(a.events), a.billing, cutoff, a.top_pages, workers, a.batch_rows), None
    events, _ = read_events(a.events)
    billing = read_billing(a.billing)[0] if a.billing else None

    import pyarrow as pa

    from .data.userbatch import prepare
    from .inference import _event_columns

    def gen():
        for ev, bill in iter_user_batches(events, billing, a.batch_users):
            evt = pa.Table.from_pandas(_event_columns(ev), preserve_index=False)
            bt = None if bill is None else pa.Table.from_pandas(bill, preserve_index=False)
            yield model.score(prepare(evt, bt, model.context(cutoff)), a.top_pages)
    return gen(), int(events["user_id"].nunique())


def _auto_workers(model) -> int:
    """Worker processes when --workers is not given: on a GPU all cores but two feed it; on a CPU the model
    needs the cores, so the splits are prepared in this process."""
    if model.device.type != "cuda":
        return 0
    return max(1, min(32, (os.cpu_count() or 2) - 2))


def cmd_recommend(a: argparse.Namespace) -> int:
    from .inference import SessionBERT

    model = SessionBERT.from_run(a.run, device=a.device)
    model.packed = a.packed
    tables, n_users = _tables(a, model)
    write, close = _writer(Path(a.out))
    advance, stop = _progress(n_users)
    t0, scored, skipped = time.perf_counter(), 0, Counter()
    try:
        for t in tables:
            write(t)
            reasons = [r for r in t.column("skipped_reason").to_pylist() if r is not None] \
                if t.column("skipped_reason").null_count < t.num_rows else []
            skipped.update(reasons)
            scored += t.num_rows - len(reasons)
            advance(t.num_rows)
    except BaseException:
        stop()
        try:
            close()
            os.unlink(a.out)
        except OSError:
            pass
        raise
    stop()
    close()
    secs = time.perf_counter() - t0
    why = ", ".join(f"{n} {r}" for r, n in skipped.items()) or "none"
    print(f"sessionbert recommend: {scored} users scored, {sum(skipped.values())} skipped ({why}) "
          f"in {secs:.1f} s on {model.device.type} -> {a.out}", file=sys.stderr)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import importlib.util

    from .inference import SessionBERT

    if a.onnx:  # before loading the model: torch's ONNX exporter needs both packages (the `onnx` extra)
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"sessionbert export --onnx: {', '.join(missing)} not installed (pip install 'sessionbert[onnx]')",
                  file=sys.stderr)
            return 2
    model = SessionBERT.from_run(a.run, device="cpu")
    out = model.export_hf(a.out)
    msg = f"sessionbert export: Hugging Face encoder + tokenizer -> {out}"
    if a.onnx:
        p = model.export_onnx(Path(a.out) / "encoder.onnx")
        msg += f"; ONNX encoder -> {p}"
    print(msg, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sessionbert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recommend", help="persona, top new services and next pages per user of a session log")
    r.add_argument("--run", required=True, help="a finished run dir (metrics.json, run_config.yaml)")
    r.add_argument("--events", required=True, help="events: .parquet / .csv / .jsonl file or a folder of them")
    r.add_argument("--out", required=True, help="output .parquet or .jsonl, one row per user")
    r.add_argument("--billing", help="optional billing table (user_id, month, service, spend_usd); Parquet is read "
                                    "per batch for its users, CSV / JSONL read whole")
    r.add_argument("--cutoff", help="only sessions starting before this time (ISO 8601; naive = UTC); default all")
    r.add_argument("--batch-users", type=int, default=1000,
                   help="users scored at a time when the input is read whole (--no-stream; default 1000)")
    r.add_argument("--batch-rows", type=int, default=1_000_000,
                   help="rows per streamed batch of whole users: a split of whole row groups of a Parquet file, "
                        "blocks of a CSV / JSONL file or folder (default 1,000,000)")
    r.add_argument("--workers", type=int, default=-1,
                   help="processes preparing the streamed batches: for a Parquet file they read, validate, "
                        "serialise and tokenise its splits; for CSV / JSONL this process reads and validates and "
                        "they serialise and tokenise (default: cores - 2 on a GPU, 0 on a CPU: all in this "
                        "process)")
    r.add_argument("--top-pages", type=int, default=5, help="next pages listed per user (default 5)")
    r.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    r.add_argument("--packed", action=argparse.BooleanOptionalAction, default=None,
                   help="encode sessions packed end to end (variable-length attention, no padding computed; same "
                        "outputs). Default: packed on CUDA (1.31x users/s on an H200), padded on a CPU (faster there)")
    r.add_argument("--no-stream", action="store_true",
                   help="read the input whole instead of streaming it (needed when a user's rows are not "
                        "together in the input)")
    r.set_defaults(fn=cmd_recommend)
    e = sub.add_parser("export", help="export the fine-tuned encoder (Hugging Face format, optionally ONNX)")
    e.add_argument("--run", required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--onnx", action="store_true", help="also write encoder.onnx (dynamic batch and sequence)")
    e.set_defaults(fn=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .data.io import BadInputError
    from .inference import MissingRunFileError

    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (BadInputError, MissingRunFileError, FileNotFoundError) as e:
        print(f"sessionbert {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
