"""Streaming prep (sessionbert.data.prep): the shards hold exactly the ids of the in-memory path (Corpus.build +
SessionEncoder.build) under every truncation case, in fixed-size shards, the tokenizer sample is
Corpus.train_texts, and inputs that break the streaming contract fail naming the file and row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sessionbert.data.corpus import Corpus
from sessionbert.data.prep import PrepInputError, WINDOWS, iter_shards, prep_shards, read_manifest
from sessionbert.data.serialize import SessionEncoder
from sessionbert.data.simulator import sim_config, simulate_to_dir
from sessionbert.data.tokenizer import load_tokenizer, train_wordpiece


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    simulate_to_dir(sim_config("tiny", n_users=120), d, write_stats=False)
    return d


@pytest.fixture(scope="module")
def corpus(sim):
    return Corpus.build(pd.read_parquet(sim / "events.parquet"), pd.read_parquet(sim / "billing.parquet"), 14, 28)


@pytest.fixture(scope="module")
def shards(sim, tmp_path_factory):
    """Small record batches and shards, so that users, sessions and shards all cross batch boundaries."""
    out = tmp_path_factory.mktemp("shards") / "s"
    m = prep_shards(sim / "events.parquet", out, sim / "billing.parquet", seq_len=64, vocab_size=400,
                    shard_sessions=300, batch_rows=3000)
    return out, m


def _table(d):
    return pa.concat_tables(list(iter_shards(d)))


@pytest.mark.parametrize("seq_len", [64, 20, 6, None])
def test_prep_ids_equal_corpus_session_encoder(sim, corpus, shards, tmp_path, seq_len):
    """64: most sessions truncated at event boundaries; 20: the newest event alone too long (its end is kept);
    6: metadata alone too long (its start is kept); None: whole sessions."""
    tok = load_tokenizer(shards[0] / "tokenizer")
    out = tmp_path / "s"
    prep_shards(sim / "events.parquet", out, sim / "billing.parquet", seq_len=seq_len, tokenizer=tok,
                shard_sessions=250, batch_rows=2000)
    t = _table(out)
    enc_obj = SessionEncoder(tok, seq_len or 10**9)
    enc = corpus.encode(enc_obj)
    assert t.column("session_id").to_pylist() == corpus.sessions["session_id"].tolist()
    assert t.column("user_id").to_pylist() == corpus.sessions["user_id"].tolist()
    win = np.array(WINDOWS)[t.column("window").to_numpy()]
    assert (win == corpus.sessions["window"].to_numpy()).all()
    assert (t.column("n_events").to_numpy() == corpus.sessions["n_events"].to_numpy()).all()
    ids = t.column("input_ids").to_pylist()
    expected = [enc_obj.build(enc, s) for s in range(len(ids))]
    assert ids == expected
    if seq_len is not None:
        assert max(map(len, ids)) == seq_len


def test_prep_without_billing_or_region_matches_corpus(sim, shards, tmp_path):
    ev = pd.read_parquet(sim / "events.parquet")
    c = Corpus.build(ev, None, 14, 28, use_region=False, use_billing=False)
    tok = load_tokenizer(shards[0] / "tokenizer")
    prep_shards(sim / "events.parquet", tmp_path / "s", None, seq_len=48, tokenizer=tok, use_region=False)
    enc_obj = SessionEncoder(tok, 48)
    enc = c.encode(enc_obj)
    expected = [enc_obj.build(enc, s) for s in range(len(c.sessions))]
    assert _table(tmp_path / "s").column("input_ids").to_pylist() == expected


def test_prep_shards_fixed_size_and_manifest(shards, corpus):
    out, m = shards
    assert m == {**read_manifest(out), "seconds": m["seconds"]}
    sizes = [s["sessions"] for s in m["shards"]]
    assert sizes[:-1] == [300] * (len(sizes) - 1) and 0 < sizes[-1] <= 300 and len(sizes) >= 3
    assert m["n_sessions"] == len(corpus.sessions) and m["n_events"] == len(corpus.events)
    assert m["windows"] == corpus.sessions["window"].value_counts().reindex(list(WINDOWS)).to_dict()
    for s in m["shards"]:
        t = pq.read_table(out / s["file"])
        assert t.num_rows == s["sessions"] and sum(map(len, t.column("input_ids").to_pylist())) == s["tokens"]
    train = pa.concat_tables(list(iter_shards(out, windows=("train",))))
    assert train.num_rows == m["windows"]["train"] and set(train.column("window").to_pylist()) == {0}
    assert not list(out.parent.glob(".*tmp*")) and not list(out.glob("*.tmp"))


def test_prep_tokenizer_sample_is_corpus_train_texts(sim, corpus, shards, tmp_path, monkeypatch):
    """With a sample covering every training session, the tokenizer is trained on exactly the texts the pipeline
    trains it on (the trainer itself breaks ties run-dependently, so the texts are compared, not vocabularies)."""
    import sessionbert.data.tokenizer as tk

    seen = []

    def spy(texts, vocab_size, min_frequency):
        seen.append(list(texts))
        return train_wordpiece(seen[-1], vocab_size, min_frequency)

    monkeypatch.setattr(tk, "train_wordpiece", spy)
    m = prep_shards(sim / "events.parquet", tmp_path / "s", sim / "billing.parquet", vocab_size=400, batch_rows=3000)
    assert seen == [list(corpus.train_texts())]
    assert m["tokenizer_note"]["sample_sessions"] == m["windows"]["train"]  # default sample (20k) > tiny data
    assert shards[1]["tokenizer_note"]["vocab_size"] > 300


def test_prep_bounded_tokenizer_sample(sim, tmp_path):
    m = prep_shards(sim / "events.parquet", tmp_path / "s", sim / "billing.parquet", vocab_size=300,
                    tokenizer_sample=100, batch_rows=2000)
    assert m["tokenizer_note"]["sample_sessions"] == 100


def _rewrite(src, dst, fn):
    pq.write_table(fn(pq.read_table(src)), dst)
    return dst


def test_prep_input_contract_errors_name_file_and_row(sim, shards, tmp_path):
    tok = load_tokenizer(shards[0] / "tokenizer")
    ev = pq.read_table(sim / "events.parquet")
    n = ev.num_rows
    # users out of order: the second half first
    bad = _rewrite(sim / "events.parquet", tmp_path / "unsorted.parquet",
                   lambda t: pa.concat_tables([t.slice(n // 2), t.slice(0, n // 2)]))
    with pytest.raises(PrepInputError, match=r"unsorted\.parquet: events must be sorted by user_id \(row \d+\)"):
        prep_shards(bad, tmp_path / "o1", tokenizer=tok, batch_rows=100_000)
    assert ev.num_rows == n
    # billing not sorted by user
    bill = _rewrite(sim / "billing.parquet", tmp_path / "bill.parquet",
                    lambda t: pa.concat_tables([t.slice(t.num_rows // 2), t.slice(0, t.num_rows // 2)]))
    with pytest.raises(PrepInputError, match=r"bill\.parquet: billing must be sorted by user_id"):
        prep_shards(sim / "events.parquet", tmp_path / "o4", bill, tokenizer=tok)
    # nothing half-written is left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def _manifest_without_timings(m):
    return {k: v for k, v in m.items() if k not in ("seconds", "source")} | {
        "source": {k: v and Path(v).name for k, v in m["source"].items()}}


@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_prep_workers_equal_serial(sim, shards, tmp_path, monkeypatch, given_tokenizer):
    """workers=2 (spawned processes serialise and encode the chunks after the tokenizer's sample): the same shards,
    tokenizer and manifest as the serial run. Small batches and shards: many chunks, more than 2 * workers.
    WordPiece training breaks ties run-dependently, so the trainer is replaced by one that records its texts (they
    must be the same) and returns a fixed tokenizer; the pool is then given the tokenizer trained in the run."""
    import sessionbert.data.tokenizer as tk

    tok = load_tokenizer(shards[0] / "tokenizer")
    seen = []

    def fixed(texts, vocab_size, min_frequency):
        seen.append(list(texts))
        return tok, {"fixed": True}

    monkeypatch.setattr(tk, "train_wordpiece", fixed)
    kw = dict(seq_len=64, vocab_size=400, shard_sessions=300, batch_rows=3000)
    kw |= {"tokenizer": tok} if given_tokenizer else {"tokenizer_sample": 150}
    a = prep_shards(sim / "events.parquet", tmp_path / "serial", sim / "billing.parquet", **kw)
    b = prep_shards(sim / "events.parquet", tmp_path / "par", sim / "billing.parquet", workers=2, **kw)
    assert len(seen) == (0 if given_tokenizer else 2) and (not seen or seen[0] == seen[1])
    assert _manifest_without_timings(a) == _manifest_without_timings(b)
    assert len(a["shards"]) >= 3
    for s in a["shards"]:
        ta, tb = pq.read_table(tmp_path / "serial" / s["file"]), pq.read_table(tmp_path / "par" / s["file"])
        assert ta.num_rows > 0 and ta.equals(tb), s["file"]
    assert ((tmp_path / "serial" / "tokenizer" / "tokenizer.json").read_bytes()
            == (tmp_path / "par" / "tokenizer" / "tokenizer.json").read_bytes())


def test_prep_workers_input_errors_as_serial(sim, shards, tmp_path):
    """The parallel path raises the serial path's error (file and row), and leaves nothing half-written."""
    tok = load_tokenizer(shards[0] / "tokenizer")
    n = pq.ParquetFile(sim / "events.parquet").metadata.num_rows
    bad = _rewrite(sim / "events.parquet", tmp_path / "unsorted.parquet",
                   lambda t: pa.concat_tables([t.slice(n // 2), t.slice(0, n // 2)]))
    msgs = []
    for w in (0, 2):
        with pytest.raises(PrepInputError, match=r"unsorted\.parquet: events must be sorted by user_id") as e:
            prep_shards(bad, tmp_path / f"o{w}", tokenizer=tok, batch_rows=3000, workers=w)
        msgs.append(str(e.value))
    bill = _rewrite(sim / "billing.parquet", tmp_path / "bill.parquet",
                    lambda t: pa.concat_tables([t.slice(t.num_rows // 2), t.slice(0, t.num_rows // 2)]))
    for w in (0, 2):  # raised in this process, by the billing merge join
        with pytest.raises(PrepInputError, match=r"bill\.parquet: billing must be sorted by user_id") as e:
            prep_shards(sim / "events.parquet", tmp_path / f"ob{w}", bill, tokenizer=tok, batch_rows=3000, workers=w)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and msgs[2] == msgs[3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def test_prep_restores_corpus_order_within_users(sim, shards, tmp_path):
    """Users sorted but their rows not (as read_events writes them: sessions by id, not start): same ids as
    Corpus.build, which sorts by user, session start, session_id, timestamp."""
    tok = load_tokenizer(shards[0] / "tokenizer")
    ev = pq.read_table(sim / "events.parquet")
    rng = np.random.default_rng(0)
    uid = ev.column("user_id").to_numpy(zero_copy_only=False)
    # shuffle rows within each user (sessions interleaved, events out of time order), users kept in order
    order = np.lexsort((rng.random(len(uid)), pd.factorize(uid, sort=True)[0]))
    pq.write_table(ev.take(pa.array(order)), tmp_path / "shuffled.parquet")
    prep_shards(tmp_path / "shuffled.parquet", tmp_path / "s", sim / "billing.parquet", seq_len=64, tokenizer=tok,
                batch_rows=2500)
    c = Corpus.build(ev.take(pa.array(order)).to_pandas(), pd.read_parquet(sim / "billing.parquet"), 14, 28)
    enc_obj = SessionEncoder(tok, 64)
    enc = c.encode(enc_obj)
    t = _table(tmp_path / "s")
    assert t.column("session_id").to_pylist() == c.sessions["session_id"].tolist()
    assert t.column("input_ids").to_pylist() == [enc_obj.build(enc, s) for s in range(len(c.sessions))]


def test_prep_refuses_existing_output_and_missing_columns(sim, shards, tmp_path):
    out, _ = shards
    with pytest.raises(FileExistsError, match="overwrite"):
        prep_shards(sim / "events.parquet", out)
    nocol = _rewrite(sim / "events.parquet", tmp_path / "nocol.parquet", lambda t: t.drop(["page"]))
    with pytest.raises(PrepInputError, match=r"nocol\.parquet: missing required columns \['page'\]"):
        prep_shards(nocol, tmp_path / "o")


def test_general_bert_tokenizer_ids_without_its_json_truncation_and_padding(sim, corpus, tmp_path):
    """all-MiniLM-L6-v2's tokenizer.json truncates and pads every text to 128 tokens; the Rust tokenizer used
    directly (SessionEncoder, the streaming prep, `sessionbert recommend`'s workers) must give transformers' ids
    (without them), for the corpus and the prep alike, and leave the loaded tokenizer as it was."""
    from sessionbert.data.prep import _Ids
    from sessionbert.data.serialize import backend_of
    from sessionbert.models.encoder import default_general_bert_dir

    tok = load_tokenizer(default_general_bert_dir())
    raw = tok.backend_tokenizer
    assert raw.padding is not None and raw.truncation is not None  # what the shipped JSON carries
    texts = corpus.texts.unique().tolist()[:50] + corpus.meta[:50]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    fresh = load_tokenizer(default_general_bert_dir())
    assert SessionEncoder(fresh, 64)._ids(texts) == want
    assert [a.tolist() for a in _Ids(load_tokenizer(default_general_bert_dir()))(np.array(texts, object))] == want
    assert backend_of(fresh).padding is None and fresh.backend_tokenizer.padding is not None
    out = tmp_path / "g"
    prep_shards(sim / "events.parquet", out, sim / "billing.parquet", seq_len=64,
                tokenizer=load_tokenizer(default_general_bert_dir()), shard_sessions=250, batch_rows=2000)
    enc_obj = SessionEncoder(tok, 64)
    enc = corpus.encode(enc_obj)
    assert _table(out).column("input_ids").to_pylist() == [enc_obj.build(enc, s) for s in range(len(corpus.sessions))]
