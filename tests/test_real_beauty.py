"""Amazon Beauty adapter (counts vs SOURCE.md), leave-one-out split, full-ranking and 99-negative metrics on toy
inputs (hand-checked and against torchmetrics), the causal next-item encoder (no look-ahead, learns a toy
sequence rule) and the result rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG

from sessionbert.realdata import _beauty_core as core
from sessionbert.realdata import _itembert as ib
from sessionbert.realdata import beauty as B
from sessionbert.realdata.base import RESULT_COLUMNS, shared_data_dir

HAVE_DATA = (shared_data_dir() / "amazon-beauty" / core.SEQ_FILE).exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="../shared/data/amazon-beauty not present")


def _toy(tmp_path, lines="1 1 2 3 4\n2 3 4 5\n", attrs=None):
    (tmp_path / core.SEQ_FILE).write_text(lines)
    (tmp_path / core.ATTR_FILE).write_text(json.dumps(attrs or {"1": [7], "2": [7, 9], "3": [9], "4": [8],
                                                                 "5": [7, 8]}))
    return tmp_path


def test_read_and_load_toy(tmp_path):
    a = B.load(_toy(tmp_path))
    assert a.counts["users"] == 2 and a.counts["interactions"] == 7 and a.counts["items"] == 5
    u1 = a.events[a.events.user_id == "1"]
    assert u1.page.tolist() == ["1", "2", "3", "4"]  # file order kept (no timestamps)
    # attr7 is on 3 items, attr9 and attr8 on 2: item 2 -> attr7 ("service"), item 4 -> attr8
    assert u1.service.tolist() == ["attr7", "attr7", "attr9", "attr8"]
    assert u1.page_title.tolist()[1] == "attr7 attr9"
    assert a.events.timestamp.isna().all() and a.missing() == ["timestamps"]
    import pyarrow as pa

    from sessionbert.data.schema import EVENT_SCHEMA
    t = pa.Table.from_pandas(a.events[EVENT_SCHEMA.names], schema=EVENT_SCHEMA, preserve_index=False)
    assert t.num_rows == len(a.events)  # the events are in our schema


def test_bad_input_names_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"Beauty.txt:2: non-integer"):
        core.read_beauty(_toy(tmp_path, "1 1 2 3\n2 3 x 5\n"))
    with pytest.raises(ValueError, match=r"Beauty.txt:1: user 1 has no items"):
        core.read_beauty(_toy(tmp_path, "1\n"))


def test_leave_one_out_split():
    seqs = [[5, 6, 7, 8], [1, 2, 3]]
    t_in, t_tg = core.loo_split(seqs, "test")
    v_in, v_tg = core.loo_split(seqs, "valid")
    assert t_in == [[4, 5, 6], [0, 1]] and t_tg.tolist() == [7, 2]  # 0-based columns
    assert v_in == [[4, 5], [0]] and v_tg.tolist() == [6, 1]
    assert core.train_part(seqs) == [[4, 5], [0]]
    with pytest.raises(ValueError, match=">= 3 items"):
        core.loo_split([[1, 2]], "test")


def test_full_ranking_metrics_hand_checked():
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.5],   # target 2: items 0, 1 above it but 0 is in history -> rank 2
                       [0.1, 0.2, 0.3, 0.4, 0.5]])  # target 0: every other item above it -> rank 5
    ranks = core.full_ranks(scores, [[0], [3]], np.array([2, 0]))  # item 3 removed from user 2's ranking
    assert ranks.tolist() == [2, 4]
    m = ib.hr_ndcg(ranks, (1, 2, 5))
    assert m["HR@1"] == 0 and m["HR@2"] == 0.5 and m["HR@5"] == 1.0
    assert m["NDCG@2"] == pytest.approx(0.5 / np.log2(3))
    assert m["NDCG@5"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / 2)
    # ties count against the target: a constant scorer ranks every target last
    assert core.full_ranks(np.zeros((1, 4)), [[]], np.array([1])).tolist() == [4]
    with pytest.raises(ValueError, match="also excluded"):
        core.full_ranks(scores, [[2], []], np.array([2, 0]))


def test_metrics_match_torchmetrics():
    g = np.random.default_rng(0)
    scores = g.normal(size=(30, 40)).astype(np.float32)
    targets = g.integers(0, 40, 30)
    ranks = core.full_ranks(scores, [[] for _ in range(30)], targets)
    mine = ib.hr_ndcg(ranks, (5, 10))
    preds = torch.from_numpy(scores).flatten()
    rel = torch.zeros(30, 40, dtype=torch.bool)
    rel[torch.arange(30), torch.from_numpy(targets)] = True
    idx = torch.arange(30).repeat_interleave(40)
    for k in (5, 10):
        assert mine[f"HR@{k}"] == pytest.approx(float(RetrievalHitRate(top_k=k)(preds, rel.flatten(), idx)))
        assert mine[f"NDCG@{k}"] == pytest.approx(float(RetrievalNormalizedDCG(top_k=k)(preds, rel.flatten(), idx)),
                                                  abs=1e-6)


def test_sampled_negatives_and_ranks():
    seqs = [[1, 2, 3], [4, 5, 6, 7]]
    neg = core.sample_negatives(seqs, 20, 10, seed=3)
    assert neg.shape == (2, 10)
    for s, n in zip(seqs, neg):
        assert len(set(n)) == 10 and not set(n) & {i - 1 for i in s} and n.max() < 20
    assert (core.sample_negatives(seqs, 20, 10, seed=3) == neg).all()
    with pytest.raises(ValueError, match="user 0: only 8 unseen items"):
        core.sample_negatives(seqs, 11, 10, seed=3)
    scores = np.arange(20, dtype=np.float32)[None].repeat(2, 0)  # item j scores j
    ranks = core.sampled_ranks(scores, np.array([19, 0]), np.array([[0, 1, 2], [5, 6, 7]]))
    assert ranks.tolist() == [1, 4]


def test_causal_encoder_never_looks_ahead():
    torch.manual_seed(0)
    m = ib.ItemBert(ib.EncoderCfg(n_items=20, hidden=16, layers=2, heads=2, max_len=8, dropout=0.0)).eval()
    a = torch.tensor([[0, 0, 3, 4, 5, 6]])
    b = torch.tensor([[0, 0, 3, 4, 9, 12]])  # same prefix, other future
    with torch.no_grad():
        ha, hb = m(a, causal=True), m(b, causal=True)
    assert torch.isfinite(ha).all()  # left padding must not produce NaN
    torch.testing.assert_close(ha[0, 2:4], hb[0, 2:4])
    assert not torch.allclose(ha[0, 4], hb[0, 4])


def test_next_item_model_learns_successor_rule():
    """Item i is always followed by i+1 (mod 12): after training, the test target ranks first."""
    g = np.random.default_rng(0)
    seqs = [[(s + j) % 12 + 1 for j in range(int(n))] for s, n in zip(g.integers(0, 12, 200), g.integers(4, 8, 200))]
    torch.manual_seed(0)
    m = ib.ItemBert(ib.EncoderCfg(n_items=12, hidden=32, layers=1, heads=2, max_len=8, dropout=0.0))
    with ib.cpu_threads(1):
        info = ib.train_next_item(m, core.train_part(seqs), epochs=10, batch_size=32, lr=5e-3, weight_decay=0.0,
                                  seed=0, mlm_epochs=1, log=lambda s: None)
    assert info["history"][-1]["loss"] < 0.2
    t_in, t_tg = core.loo_split(seqs, "test")
    full, samp = core.model_ranks(m, t_in, t_tg, core.sample_negatives(seqs, 12, 3, 0))
    assert (full == 1).mean() > 0.95 and (samp == 1).mean() > 0.95


def test_info_nce_prefers_matching_views():
    a = torch.eye(4) * 5
    assert float(ib.info_nce(a, a.clone(), 1.0)) < 0.05  # each view's positive is by far the most similar
    assert float(ib.info_nce(a, a.roll(1, 0), 1.0)) > 4  # mismatched pairs: large loss


def test_result_rows_one_per_published_number():
    res = {"ours": {f"{m}@{k}": 0.1 for m in ("HR", "NDCG") for k in (5, 10, 20)},
           "popularity": {f"{m}@{k}": 0.01 for m in ("HR", "NDCG") for k in (5, 10, 20)},
           "ours_sampled99": {"HR@1": 0.2, "HR@5": 0.4, "NDCG@5": 0.3, "HR@10": 0.5, "NDCG@10": 0.35},
           "popularity_sampled99": {"HR@1": 0.1, "HR@5": 0.2, "NDCG@5": 0.15, "HR@10": 0.3, "NDCG@10": 0.2}}
    rows = B.rows_from_results(res, seed=0)
    pub = [r for r in rows if r.published is not None]
    assert len(pub) == 6 * 5 + 3
    iclrec = [r for r in pub if r.source.startswith("ICLRec") and r.metric == "HR@5"]
    assert iclrec[0].published == 0.0500 and iclrec[0].ours == 0.1 and "full ranking" in iclrec[0].protocol
    pop = [r for r in pub if r.source.startswith("PopRec") and r.metric == "HR@5"][0]
    assert pop.ours == 0.01  # the PopRec row holds our popularity floor
    assert all("99 sampled negatives" in r.protocol for r in pub if r.published > 0.3)
    assert all(set(r.as_dict()) == set(RESULT_COLUMNS) for r in rows)


@needs_data
def test_real_counts_match_source_md():
    a = B.load()
    c = a.counts
    assert (c["users"], c["items"], c["max_item_id"], c["interactions"]) == (22363, 12101, 12101, 198502)
    assert (c["seq_len_mean"], c["seq_len_min"], c["seq_len_max"]) == (8.88, 5, 204)
    assert (c["attr_items"], c["attr_distinct"], c["attr_mean_per_item"]) == (12101, 637, 3.72)
    assert len(a.events) == 198502


@needs_data
def test_real_no_repeated_items_so_history_masking_is_safe():
    data = core.read_beauty(shared_data_dir() / "amazon-beauty")
    assert all(len(set(s)) == len(s) for s in data.seqs)


@needs_data
def test_real_popularity_floor_near_published_poprec():
    data = core.read_beauty(shared_data_dir() / "amazon-beauty")
    t_in, t_tg = core.loo_split(data.seqs, "test")
    neg = core.sample_negatives(data.seqs[:2000], data.n_items, 99, 0)
    full, _ = core.popularity_ranks(core.popularity(core.train_part(data.seqs), data.n_items), t_in[:2000],
                                    t_tg[:2000], neg)
    full_all, _ = core.popularity_ranks(core.popularity(core.train_part(data.seqs), data.n_items), t_in, t_tg,
                                        np.zeros((len(t_in), 1), dtype=np.int64))
    assert ib.hr_ndcg(full_all, (5,))["HR@5"] == pytest.approx(0.0080, abs=0.004)  # PopRec 0.0080 (S3-Rec)
    assert len(full) == 2000


def test_evaluate_end_to_end_on_toy_files(tmp_path):
    import yaml
    from pathlib import Path
    g = np.random.default_rng(0)
    lines = "".join(f"{u} " + " ".join(str((s + j) % 30 + 1) for j in range(int(n))) + "\n"
                    for u, (s, n) in enumerate(zip(g.integers(0, 30, 40), g.integers(5, 8, 40)), start=1))
    d = _toy(tmp_path, lines, {str(i): [i % 4, 10 + i % 3] for i in range(1, 31)})
    cfg = yaml.safe_load((Path(__file__).parents[1] / "conf/experiment/real_beauty.yaml").read_text())
    c = cfg["realdata"]
    c.update(dir=str(d), device="cpu", n_negatives=10, results_json=None)  # 30 toy items cannot give 99 negatives
    c["model"].update(hidden=16, max_len=10)
    c["train"].update(epochs=1, mlm_epochs=1, eval_every=1, batch_size=16)
    rows = B.evaluate(cfg)
    assert len([r for r in rows if r.published is not None]) == 33
    assert all(r.ours is not None and 0 <= r.ours <= 1 for r in rows)
    res = core.run(c, d, "cpu")  # same seed, same numbers: deterministic
    (tmp_path / "r.json").write_text(json.dumps(res))
    again = B.evaluate({**c, "results_json": str(tmp_path / "r.json")})
    assert [r.ours for r in again] == [r.ours for r in rows]
    with pytest.raises(FileNotFoundError, match="real_beauty_gpu.sh"):
        B.evaluate({**c, "results_json": str(tmp_path / "missing.json")})
