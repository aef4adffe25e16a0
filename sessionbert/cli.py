"""The `sessionbert` command: score session logs with a trained run, or export its model.

    sessionbert recommend --run DIR --events FILE --out FILE [--billing FILE] [--cutoff TS] [--batch-users N]
    sessionbert export --run DIR --out DIR [--onnx]

`recommend` reads Parquet / CSV / JSONL (a file or a folder) through `sessionbert.data.io.read_events`, so a
malformed row stops it with `file:line: reason`; writes Parquet (`.parquet`) or JSON lines (`.jsonl`) with one row
per user (columns of `sessionbert.inference.COLUMNS`; users not scored have `skipped_reason` set); scores
`--batch-users` users at a time (only one batch is serialised, encoded and held as results at once; the output
is written batch by batch); a single Parquet file is streamed, so only one batch of users is ever read into memory
(the file must hold each user's rows together, e.g. sorted by user_id; `--no-stream` reads it whole);
uses the GPU when there is one. Services, pages and actions never seen in training
are tokenised by the run's WordPiece tokenizer exactly as in training (pieces outside its vocabulary -> [UNK]).
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
    """(write(df), close()) for `path` by suffix, through a temp file renamed at the end."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise SystemExit(f"sessionbert: --out must end in .parquet or .jsonl, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("user_id", pa.string()), ("n_sessions", pa.int64()), ("persona", pa.string()),
                            ("cluster", pa.int64()), ("persona_similarity", pa.float64()),
                            ("new_services", pa.list_(pa.string())), ("new_service_scores", pa.list_(pa.float64())),
                            ("new_service_counts", pa.list_(pa.int64())), ("next_pages", pa.list_(pa.string())),
                            ("next_page_probs", pa.list_(pa.float64())), ("skipped_reason", pa.string())])
        w = pq.ParquetWriter(str(tmp), schema)

        def write(df):
            w.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))

        def close():
            w.close()
            os.replace(tmp, path)
    else:
        fh = open(tmp, "w", encoding="utf-8")

        def write(df):
            for rec in df.to_dict(orient="records"):
                rec = {k: (None if v is not None and not isinstance(v, (list, str)) and v != v else v)
                       for k, v in rec.items()}  # NaN / NA -> null
                if rec.get("cluster") is not None:
                    rec["cluster"] = int(rec["cluster"])
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


def _batches(a: argparse.Namespace, billing):
    """(events, billing) per batch of users, and the number of users (None when streaming: not known ahead).

    A single Parquet file is streamed (`io.iter_events_by_user`: one batch of users in memory, the file grouped by
    user); CSV / JSONL / folders, or `--no-stream`, are read whole and cut into batches."""
    from .data.io import iter_events_by_user, read_events
    from .inference import iter_user_batches

    src = Path(a.events)
    if src.is_file() and src.suffix.lower() == ".parquet" and not a.no_stream:
        def gen():
            for ev in iter_events_by_user(src, a.batch_users):
                yield ev, (None if billing is None else billing[billing["user_id"].isin(ev["user_id"].unique())])
        return gen(), None
    events, _ = read_events(a.events)
    return iter_user_batches(events, billing, a.batch_users), int(events["user_id"].nunique())


def cmd_recommend(a: argparse.Namespace) -> int:
    from .data.io import read_billing
    from .inference import SessionBERT

    model = SessionBERT.from_run(a.run, device=a.device)
    billing = read_billing(a.billing)[0] if a.billing else None
    cutoff = None
    if a.cutoff:
        from .pipeline import _utc

        cutoff = _utc(a.cutoff)
    batches, n_users = _batches(a, billing)
    write, close = _writer(Path(a.out))
    advance, stop = _progress(n_users)
    t0, scored, skipped = time.perf_counter(), 0, Counter()
    try:
        for ev, bill in batches:
            df = model.predict(ev, bill, cutoff, top_pages=a.top_pages)
            write(df)
            reasons = df["skipped_reason"].dropna()
            skipped.update(reasons)
            scored += len(df) - len(reasons)
            advance(len(df))
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
    from .inference import SessionBERT

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
    r.add_argument("--billing", help="optional billing table (user_id, month, service, spend_usd)")
    r.add_argument("--cutoff", help="only sessions starting before this time (ISO 8601; naive = UTC); default all")
    r.add_argument("--batch-users", type=int, default=1000, help="users scored at a time (default 1000)")
    r.add_argument("--top-pages", type=int, default=5, help="next pages listed per user (default 5)")
    r.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    r.add_argument("--no-stream", action="store_true",
                   help="read a Parquet file whole instead of streaming it (needed when a user's rows are not "
                        "together in the file)")
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
