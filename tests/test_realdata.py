"""Real public data (issue 5): adapters (counts vs SOURCE.md), protocols on hand-checked toy inputs, the
next-item model, the runner's table. Data are read in place from ../shared/data (skipped when absent)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sessionbert.realdata.base import RESULT_COLUMNS, ResultRow, shared_data_dir
from sessionbert.realdata.protocols import (
    accuracy,
    cptplus_folds,
    cptplus_hit,
    cptplus_query,
    cptplus_sequences,
    file_order_split,
    markov_floor,
    next_event_pairs,
    tax_prefixes,
    tax_split,
)
from sessionbert.realdata.seqio import collapse_repeats, parse_int_lines

needs_data = pytest.mark.skipif(not (shared_data_dir() / "README.md").exists(), reason="shared data not present")


# ---- adapters: counts as in SOURCE.md ------------------------------------------------------------------
@needs_data
def test_msnbc_counts_and_speed():
    from sessionbert.realdata import msnbc

    t0 = time.perf_counter()
    cats, values, offsets = msnbc.read_raw()
    assert time.perf_counter() - t0 < 10  # vectorised: about a second for 989,818 lines
    lens = np.diff(offsets)
    assert len(lens) == 989_818 and len(values) == 4_698_794
    assert cats[:3] == ["frontpage", "news", "tech"] and cats[-1] == "travel" and len(cats) == 17
    assert (lens >= 2).sum() == 624_383 and lens.max() == 14_795
    assert np.bincount(values)[[1, 2, 8]].tolist() == [940_469, 452_387, 439_398]


@needs_data
def test_msnbc_load_rows():
    from sessionbert.realdata import msnbc

    a = msnbc.load(max_lines=3)
    # lines 8-10 of the file: "1 1", "2", "3 2 2 4 2 2 2 3 3"
    assert a.events["page"].tolist()[:3] == ["frontpage", "frontpage", "news"]
    assert len(a.events) == 12 and a.events["session_id"].nunique() == 3
    assert not a.has_users and not a.has_time and a.events["timestamp"].isna().all()
    assert set(a.missing()) == {"user ids", "timestamps", "services"}


@needs_data
def test_fifa_counts():
    from sessionbert.realdata import fifa

    a = fifa.load()
    assert a.counts["sessions"] == 31_602 and a.counts["events"] == 988_802 and a.counts["pages"] == 3_380
    assert a.counts["median_len"] == 16 and a.counts["max_len"] == 1_668 and a.counts["sessions_ge6"] == 24_465
    assert len(a.events) == 988_802


@needs_data
@pytest.mark.parametrize("name,events,cases,acts,maxlen", [("helpdesk", 13_710, 3_804, 9, 14),
                                                            ("bpi12w", 72_413, 9_658, 6, 74)])
def test_process_log_counts(name, events, cases, acts, maxlen):
    import importlib

    a = importlib.import_module(f"sessionbert.realdata.{name}").load()
    c = a.counts
    assert (c["events"], c["cases"], c["activities"], c["max_events_per_case"]) == (events, cases, acts, maxlen)
    assert a.has_time and not a.has_users and a.events["timestamp"].notna().all()


def test_process_log_bad_row(tmp_path):
    from sessionbert.realdata.processlog import read_log

    p = tmp_path / "log.csv"
    p.write_text("CaseID,ActivityID,CompleteTimestamp\n1,3,2012-01-01 10:00:00\n1,x,2012-01-01 11:00:00\n")
    with pytest.raises(ValueError, match=r"log.csv:3"):
        read_log(p)


def test_parse_int_lines_and_errors():
    v, o = parse_int_lines(b"1 2 \r\n3 \r\n\r\n4 5 6 \r\n", "f")
    assert v.tolist() == [1, 2, 3, 4, 5, 6] and o.tolist() == [0, 2, 3, 3, 6]
    with pytest.raises(ValueError, match=r"f:12: not an integer"):
        parse_int_lines(b"1 2\n3 a\n", "f", first_line=11)


# ---- protocols on toy inputs -----------------------------------------------------------------------
def test_tax_split_and_prefixes():
    starts = pd.to_datetime(["2020-01-03", "2020-01-01", "2020-01-02", "2020-01-05", "2020-01-04", "2020-01-06"])
    tr, te = tax_split(starts)
    assert tr.tolist() == [1, 2, 0, 4] and te.tolist() == [3, 5]  # by first event, round(2*6/3) = 4 train
    tr_f, te_f = tax_split(starts, order="file")
    assert tr_f.tolist() == [0, 1, 2, 3] and te_f.tolist() == [4, 5]
    p, y, c = tax_prefixes([[1, 2, 3], [4], [5, 6]])
    assert p == [[1], [1, 2], [5]] and y.tolist() == [2, 3, 6] and c.tolist() == [0, 0, 2]  # no end-of-case target
    p2, y2, _ = tax_prefixes([[1, 2, 3], [5, 6]], min_prefix=2)  # Tax et al.'s code: prefixes of >= 2 events
    assert p2 == [[1, 2]] and y2.tolist() == [3]
    assert accuracy(np.array([2, 0, 6]), y) == pytest.approx(2 / 3)


def test_cptplus_protocol_toy():
    seqs = [[1, 1, 2, 3, 3, 4, 5, 6, 7], [1, 2], [9, 8, 7, 6, 5, 4, 3], [2, 2, 2, 2, 2, 2, 2, 2]]
    data = cptplus_sequences(seqs, min_len=7)
    assert data == [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3]]  # collapsed first, then length >= 7
    assert cptplus_sequences(seqs, min_len=7, max_count=1) == [[1, 2, 3, 4, 5, 6, 7]]
    assert cptplus_query([1, 2, 3, 4, 5, 6, 7, 8], window=5, suffix=2) == ([2, 3, 4, 5, 6], [7, 8])
    assert cptplus_query([1, 2, 3], window=5, suffix=1) == ([1, 2], [3])
    assert cptplus_hit(8, [7, 8]) and not cptplus_hit(6, [7, 8]) and not cptplus_hit(None, [7])
    folds = cptplus_folds(28, 14)
    assert len(folds) == 14 and folds[0][1].tolist() == [0, 1] and folds[13][1].tolist() == [26, 27]
    assert all(len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 28 for tr, te in folds)
    with pytest.raises(ValueError):
        cptplus_folds(5, 14)


def test_markov_floor_and_file_order_split():
    train = [[0, 1, 1, 2], [0, 1, 2], [2, 0], [1]]
    t = markov_floor(train, 4)
    # after 0: 1 (2x); after 1: 1 (1x) vs 2 (2x) -> 2; after 2: 0; 3 never seen -> most frequent overall (1: 4x)
    assert t.tolist() == [1, 2, 0, 1]
    assert [a.tolist() for a in file_order_split(10)] == [list(range(8)), [8, 9]]
    p, y, prev = next_event_pairs([[0, 1, 2], [3]])
    assert p == [[0], [0, 1]] and y.tolist() == [1, 2] and prev.tolist() == [0, 1]
    assert collapse_repeats([1, 1, 2, 2, 1]) == [1, 2, 1]


# ---- the model ---------------------------------------------------------------------------------------
def test_next_item_model_learns_and_is_deterministic():
    from sessionbert.realdata.nextitem import fit_next_item

    # deterministic successor: item i -> (i + 1) mod 6 (a first-order chain the model must learn)
    rng = np.random.default_rng(0)
    seqs = [[(s + j) % 6 for j in range(int(rng.integers(3, 8)))] for s in rng.integers(0, 6, 300)]
    cfg = {"arch": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
           "max_len": 6, "ft_epochs": 6, "mlm_epochs": 1, "lr": 5e-3, "batch_size": 64, "dropout": 0.0}
    import torch

    threads = torch.get_num_threads()
    m = fit_next_item(seqs, 6, {**cfg, "threads": 1}, seed=1)
    assert torch.get_num_threads() == threads, "the process-wide thread count is restored"
    assert (m.predict([[0], [2, 3], [4]])[:, 0] == [1, 4, 5]).all()
    assert m.scores([[1]]).shape == (1, 6) and m.embed([[1, 2], [3]]).shape == (2, 32)
    m2 = fit_next_item(seqs, 6, cfg, seed=1)
    assert np.allclose(m.scores([[0, 1]]), m2.scores([[0, 1]]))
    with pytest.raises(ValueError, match="unknown key"):
        fit_next_item(seqs, 6, {"epochs": 3})


def test_ahead_loss_hand_value():
    import torch

    from sessionbert.realdata.nextitem import _ft_loss

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert _ft_loss(logits, torch.tensor([[1, 2]]), 0.0).item() == pytest.approx(-np.log(0.5))
    assert _ft_loss(logits, torch.tensor([[1, 1]]), 0.0).item() == pytest.approx(-np.log(0.3))  # duplicate once
    assert _ft_loss(logits, torch.tensor([[0, -100]]), 0.0).item() == pytest.approx(-np.log(0.5))


def test_result_row_columns():
    r = ResultRow("msnbc", "accuracy", "p", 0.5, 0.61, "CPT+")
    assert tuple(r.as_dict()) == RESULT_COLUMNS


# ---- pipeline integration: data=<name> --------------------------------------------------------------
def test_file_order_times_and_split_days():
    from sessionbert.data.split import time_split
    from sessionbert.realdata import file_order_split_days, file_order_times

    ev = pd.DataFrame({"session_id": ["a", "a", "b", "c", "d", "d", "e"], "page": list("1234567")})
    t = file_order_times(ev)["timestamp"]
    assert t.is_monotonic_increasing and t.iloc[2] - t.iloc[0] == pd.Timedelta(minutes=1)
    val_days, test_days = file_order_split_days(5, 0.2, 0.4)
    sp = time_split(t, val_days, test_days)
    starts = t.groupby(ev["session_id"]).min()
    assert sp.window_of(starts).tolist() == ["train", "train", "val", "test", "test"]


@pytest.mark.parametrize("name,lack", [("helpdesk", {"personas", "recommend", "finetune.service_head"}),
                                       pytest.param("msnbc", {"personas", "recommend", "finetune.service_head",
                                                              "time_split"}, marks=pytest.mark.slow)])
def test_realdata_pipeline_tiny(cfg_factory, name, lack):
    import json

    from sessionbert.pipeline import run_pipeline

    if not (shared_data_dir() / "README.md").exists():
        pytest.skip("shared data not present")
    over = [f"data={name}", "logger=csv", "model.arch=tiny", "seq_len=32", "vocab_size=200",
            "pretrain.epochs=1", "finetune.epochs=1", "pretrain.val_max_sessions=50",
            "finetune.train_prefixes_per_session=1", "finetune.eval_prefixes_per_session=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
    if name == "msnbc":
        over.append("data.max_lines=600")
    else:
        over += ["data.split.val_days=30", "data.split.test_days=60"]
    cfg = cfg_factory(over)
    m = run_pipeline(cfg)
    assert set(m["skipped"]) == lack and "personas" not in m and "recommend" not in m
    assert m["data"]["realdata"]["dataset"] == name and m["finetune"]["test_examples"] > 0
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["skipped"] == m["skipped"]
    assert "## Skipped" in (Path(cfg.paths.output_dir) / "report.md").read_text()
    ev = pd.read_parquet(Path(m["stage_dirs"]["data"]) / "events.parquet")
    assert ev["timestamp"].notna().all() and (ev["service"] == name).all()


def test_runner_goal_status_and_table(tmp_path):
    from sessionbert.realdata.__main__ import goal_status, write_results

    rows = [ResultRow("h", "accuracy", "by first event", 0.75, 0.71, "SessionBERT (ours)"),
            ResultRow("h", "accuracy", "by first event", 0.70, None, "floor: Markov"),
            ResultRow("m", "acc", "p", 0.60, 0.61, "SessionBERT (ours)"),
            ResultRow("m", "acc", "p", 0.62, 0.61, "reference: CPT+ (a)")]
    g = goal_status(rows[:2], {"metric": "accuracy", "ours_source": "SessionBERT", "protocol_contains": "first",
                               "at_least": 0.72})
    assert g == {0: "yes (>= 0.72)"}
    g2 = goal_status(rows[2:], {"metric": "acc", "ours_source": "SessionBERT", "above_source": "reference: CPT+"})
    assert g2[0].startswith("NO")
    write_results(rows, {0: g[0], 2: g2[0]}, tmp_path, {"command": "c", "commit": "x", "date": "d", "machine": "m",
                                                        "seconds": "{}"})
    df = pd.read_csv(tmp_path / "real_data.csv")
    assert tuple(df.columns) == RESULT_COLUMNS and len(df) == 4
    md = (tmp_path / "real_data.md").read_text()
    assert "| h | accuracy | by first event | 0.7500 | 0.7100 |" in md and "- m: NO" in md


def test_runner_keep_merges_an_earlier_table(tmp_path):
    """--keep: rows of datasets not run now come from the existing real_data.csv, with their goal re-checked
    against conf/experiment/real_<name>.yaml; rows of the datasets being re-run are dropped."""
    import json

    from sessionbert.realdata.__main__ import _kept, write_results

    rows = [ResultRow("helpdesk", "accuracy", "chronological 2/3-1/3, by first event, prefixes >= 1", 0.771, 0.71,
                      "SessionBERT (ours)"),
            ResultRow("msnbc", "acc", "p", 0.5, None, "SessionBERT (ours)")]
    write_results(rows, {}, tmp_path, {"command": "c", "commit": "x", "date": "d", "machine": "m", "seconds": "{}"})
    run = {"command": "c", "commit": "x", "date": "d"}
    (tmp_path / "real_data_runs.json").write_text(json.dumps({"helpdesk": {**run, "seconds": 12.0},
                                                              "msnbc": {**run, "seconds": 99.0}}))
    kept, goals, runs = _kept(tmp_path, ["msnbc"], Path(__file__).resolve().parents[1] / "conf" / "experiment")
    secs = {d: r["seconds"] for d, r in runs.items()}
    assert [r.dataset for r in kept] == ["helpdesk"] and kept[0].ours == 0.771
    assert goals == {0: "yes (>= 0.72)"} and secs == {"helpdesk": 12.0}
