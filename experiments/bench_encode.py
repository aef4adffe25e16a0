#!/usr/bin/env python3
"""Tokenising a Corpus for the in-memory stages (`SessionEncoder.encode`): ours against the per-session reference.

At paper scale the fine-tuning, personas and recommend stages build the Corpus of a 40k-user sample (~540k sessions)
and tokenise it (`Corpus.encode`). Two paths, same process, same Corpus and tokenizer:

  reference  what `SessionEncoder.encode` did before 2026-11-29: the metadata text of every session and each
             distinct event text through transformers' `tokenizer(texts, add_special_tokens=False)`
  ours       `SessionEncoder.encode`: each distinct metadata text and each distinct event text through the Rust
             tokenizer's `encode_batch` (`serialize.backend_of`), sessions sharing the id lists

The ids are checked equal. Also timed: `Corpus.build` with its sort forced (the reference, before 2026-11-29) and as
it runs now (the sort skipped when the rows are already in order, as the simulator writes them; same events
checked), and `Corpus.prefix_examples` of the three windows.

    python experiments/bench_encode.py --users 40000 --out experiments/results/bench_encode_cpu.txt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=40000, help="simulated users (~13.5 sessions each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--out", help="append the command and the result line to this file")
    a = ap.parse_args()

    from sessionbert.data.corpus import Corpus, LabelMaps
    from sessionbert.data.serialize import SessionEncoder
    from sessionbert.data.simulator import sim_config, simulate_to_dir
    from sessionbert.data.tokenizer import train_wordpiece

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-encode-"))
    data = work / "data"
    if not (data / "events.parquet").exists():
        simulate_to_dir(sim_config("default", seed=a.seed, n_users=a.users), data, write_stats=False)
    events, billing = pd.read_parquet(data / "events.parquet"), pd.read_parquet(data / "billing.parquet")
    import sessionbert.data.corpus as C

    check = C.in_session_order
    C.in_session_order = lambda *args: False  # the reference build: always sorts (before 2026-11-29)
    t0 = time.perf_counter()
    sorted_corpus = Corpus.build(events, billing, 14, 28)
    build_sorting_s = time.perf_counter() - t0
    C.in_session_order = check
    t0 = time.perf_counter()
    corpus = Corpus.build(events, billing, 14, 28)  # rows already in order: the sort is skipped
    build_s = time.perf_counter() - t0
    pd.testing.assert_frame_equal(corpus.events, sorted_corpus.events)
    del sorted_corpus
    tok, _ = train_wordpiece(corpus.train_texts(20000, seed=a.seed), 30000)
    enc_obj = SessionEncoder(tok, 64)

    t0 = time.perf_counter()  # the reference: every session's metadata and each distinct event text via __call__
    codes, uniques = pd.factorize(corpus.texts, sort=False)
    ref_meta = tok(list(corpus.meta), add_special_tokens=False)["input_ids"]
    ref_events = tok(list(uniques), add_special_tokens=False)["input_ids"]
    ref_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    enc = enc_obj.encode(corpus.meta, corpus.texts, corpus.bounds)
    ours_s = time.perf_counter() - t0
    assert enc.meta_ids == ref_meta and enc.event_ids == ref_events and (enc.event_codes == codes).all()

    labels = LabelMaps.from_corpus(corpus)
    t0 = time.perf_counter()
    n_prefixes = sum(len(corpus.prefix_examples(w, labels, cap, seed=i)[0])
                     for i, (w, cap) in enumerate((("train", 1), ("val", 3), ("test", 3))))
    prefix_s = time.perf_counter() - t0
    res = {"users": a.users, "sessions": len(corpus.sessions), "events": len(corpus.events),
           "distinct_metadata_texts": int(pd.Series(corpus.meta).nunique()), "distinct_event_texts": len(uniques),
           "corpus_build_sorting_s": round(build_sorting_s, 2), "corpus_build_s": round(build_s, 2),
           "encode_reference_s": round(ref_s, 2), "encode_ours_s": round(ours_s, 2),
           "encode_speedup": round(ref_s / ours_s, 2), "ids_equal": True, "prefix_examples_s": round(prefix_s, 2),
           "prefixes": n_prefixes, "cpus": os.cpu_count(), "python": platform.python_version(),
           "tokenizer_vocab": len(tok), "mean_tokens_per_meta": round(float(np.mean([len(m) for m in ref_meta])), 1)}
    line = json.dumps(res)
    print(line)
    if a.out:
        import sys

        with open(a.out, "a") as f:
            f.write("python " + " ".join(sys.argv) + "\n" + line + "\n")


if __name__ == "__main__":
    main()
