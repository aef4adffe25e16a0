"""msweb adapter (counts vs SOURCE.md), Breese et al. protocols on toy inputs with hand-checked answers, the
README floors on the real files, and the set-MLM encoder on a toy structure."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from sessionbert.realdata import _itembert as ib
from sessionbert.realdata import msweb as M
from sessionbert.realdata.base import shared_data_dir

HAVE_DATA = (shared_data_dir() / "msweb" / M.FILES["train"]).exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="../shared/data/msweb not present")

TOY = """I,4,"www.microsoft.com","created by getlog.pl"
T,1,"VRoot",0,0,"VRoot"
N,0,"0"
A,1001,1,"Support, Desktop","/support"
A,1000,1,"regwiz","/regwiz"
A,1002,1,"End User Produced View","/athome"
C,"10001",10001
V,1000,1
V,1001,1
C,"10002",10002
V,1002,1
"""


def _gz(path, text):
    with gzip.open(path, "wt", encoding="latin-1") as fh:
        fh.write(text)
    return path


def test_read_toy_file(tmp_path):
    f = M.read_msweb(_gz(tmp_path / "t.gz", TOY))
    assert f.areas[1001] == ("Support, Desktop", "/support")  # quoted comma kept in the title
    assert f.users == [(10001, [1000, 1001]), (10002, [1002])]
    assert f.visits == 3 and f.lines == 11


def test_bad_line_names_file_and_line(tmp_path):
    bad = TOY.replace('V,1002,1', 'V,abc,1')
    with pytest.raises(ValueError, match=r"t.gz:11: bad msweb line"):
        M.read_msweb(_gz(tmp_path / "t.gz", bad))
    with pytest.raises(ValueError, match=r"t.gz:4: .*vote before any case"):
        M.read_msweb(_gz(tmp_path / "t.gz", 'I,4,"x","y"\nT,1,"V",0,0,"V"\nN,0,"0"\nV,1000,1\n'))


def test_load_toy_marks_split_and_metadata(tmp_path):
    _gz(tmp_path / M.FILES["train"], TOY)
    _gz(tmp_path / M.FILES["test"], TOY)
    a = M.load(tmp_path)
    assert set(a.events.user_id) == {"train/10001", "train/10002", "test/10001", "test/10002"}
    row = a.events[(a.events.user_id == "train/10001") & (a.events.service == "1001")].iloc[0]
    assert (row.page, row.page_title) == ("/support", "Support, Desktop")
    assert a.events.timestamp.isna().all() and not a.has_time and a.has_users and a.has_services
    assert a.missing() == ["timestamps"]
    import pyarrow as pa

    from sessionbert.data.schema import EVENT_SCHEMA
    t = pa.Table.from_pandas(a.events[EVENT_SCHEMA.names], schema=EVENT_SCHEMA, preserve_index=False)
    assert t.num_rows == len(a.events)  # the events are in our schema


def test_cases_allbut1_and_given_k():
    sets = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    c = M.make_cases(sets, "AllBut1", 0)
    assert len(c.given) == 3  # the single-area user has nothing to give
    for gv, hd, s in zip(c.given, c.hidden, sets[1:]):
        assert len(hd) == 1 and sorted(gv + hd) == s
    c2 = M.make_cases(sets, "Given2", 0)
    assert len(c2.given) == 2  # only users with > 2 areas keep one hidden
    assert [len(g) for g in c2.given] == [2, 2] and [len(h) for h in c2.hidden] == [1, 2]
    assert M.make_cases(sets, "AllBut1", 0).hidden == c.hidden  # seeded
    with pytest.raises(ValueError, match="AllBut1 or Given"):
        M.make_cases(sets, "GivenX", 0)


def test_breese_metrics_hand_checked():
    order = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    cases = M.Cases(given=[[0], [2]], hidden=[[3], [1, 4]])
    m = M.breese_metrics(order, cases, k=2)
    # case 1: list without the given area = [1, 2, 3, 4], hidden 3 at rank 3: miss at k=2, R_a = 2^(-2/4)
    # case 2: list = [0, 1, 3, 4], hidden 1 at rank 2 (hit), 4 at rank 4: R_a = 2^(-1/4) + 2^(-3/4)
    # R_max: 1 + (1 + 2^(-1/4))
    r = 2 ** -0.5 + 2 ** -0.25 + 2 ** -0.75
    assert m["Hit@2"] == 0.5
    assert m["R"] == pytest.approx(100 * r / (1 + 1 + 2 ** -0.25))
    assert M.breese_metrics(order, cases, k=3)["Hit@3"] == 1.0


def test_scorers_and_rank_lists_on_toy():
    train = M.incidence([[0, 1], [0, 1], [0, 2], [3]], 4)
    assert M.popularity_scores(train, [[0]]).tolist() == [[3, 2, 1, 1]]
    co = M.cooccurrence_scores(train, [[0], [1, 2]])
    assert co.tolist() == [[0, 2, 1, 0], [3, 0, 0, 0]]  # area 0 with 1: 2 users, with 2: 1 user
    tie = train.sum(0)
    order = M.rank_lists(np.array([[0, 0, 0, 0.0]]), [[0]], tie)
    assert order[0].tolist() == [1, 2, 3, 0]  # ties by popularity then column; the given area last


@needs_data
def test_real_counts_match_source_md():
    c = M.load().counts
    assert c["train"] == {"A_lines": 294, "users": 32711, "visits": 98654, "lines": 131666,
                          "distinct_vroots_visited": 285, "users_with_2plus": 22716, "mean_vroots_per_user": 3.02}
    assert c["test"] == {"A_lines": 294, "users": 5000, "visits": 15191, "lines": 20492,
                         "distinct_vroots_visited": 236, "users_with_2plus": 3453, "mean_vroots_per_user": 3.04}


@needs_data
def test_real_floors_reproduce_readme():
    files = M.read_both()
    areas, sets = M._sets(files)
    train = M.incidence(sets["train"], len(areas))
    cases = M.make_cases(sets["test"], "AllBut1", 0)
    assert len(cases.given) == 3453
    tie = train.sum(0)
    pop = M.breese_metrics(M.rank_lists(M.popularity_scores(train, cases.given), cases.given, tie), cases)
    co = M.breese_metrics(M.rank_lists(M.cooccurrence_scores(train, cases.given), cases.given, tie), cases)
    # README: popularity 0.493, co-occurrence 0.596 (one random draw: +-0.01 is about 1.3 standard errors)
    assert pop["Hit@5"] == pytest.approx(0.493, abs=0.01)
    assert co["Hit@5"] == pytest.approx(0.596, abs=0.01)
    assert len(M.make_cases(sets["test"], "Given2", 0).given) == 2213  # Breese et al.'s Given2 MS Web users


def test_set_mlm_learns_pairs():
    """Areas come in fixed pairs {2i, 2i+1}: after MLM, AllBut1 must recover the partner (Hit@1 = 1)."""
    g = np.random.default_rng(0)
    sets = [[2 * p, 2 * p + 1] for p in g.integers(0, 5, 256)]
    torch.manual_seed(0)
    model = ib.ItemBert(ib.EncoderCfg(n_items=10, hidden=32, layers=1, heads=2, max_len=0, dropout=0.0))
    with ib.cpu_threads(1):
        info = ib.train_sets_mlm(model, sets, epochs=12, batch_size=32, lr=3e-3, mask_prob=0.5, weight_decay=0.0,
                                 seed=0, log=lambda s: None)
    assert info["history"][-1]["loss"] < 0.1
    cases = M.make_cases(sets[:50], "AllBut1", 1)
    sc = M.bert_scores(model, cases.given)
    order = M.rank_lists(sc, cases.given, np.zeros(10))
    assert M.breese_metrics(order, cases, k=1)["Hit@1"] == 1.0


def test_set_encoder_is_order_free():
    torch.manual_seed(0)
    model = ib.ItemBert(ib.EncoderCfg(n_items=10, hidden=16, layers=1, heads=2, max_len=0, dropout=0.0)).eval()
    a = ib.last_hidden_scores(model, [[1, 4, 7]], causal=False, append_mask=True)
    b = ib.last_hidden_scores(model, [[7, 1, 4]], causal=False, append_mask=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _toy_files(d, seed):
    g = np.random.default_rng(seed)
    head = 'I,4,"www.microsoft.com","x"\n' + "".join(f'A,{1000 + a},1,"area {a}","/a{a}"\n' for a in range(6))
    for split, n in (("train", 80), ("test", 30)):
        body = []
        for u in range(n):
            body.append(f'C,"{10001 + u}",{10001 + u}')
            p = int(g.integers(3))  # three "personas": areas {0,1}, {2,3}, {4,5}, sometimes one more
            extra = [f"V,{1000 + int(g.integers(6))},1"] * int(g.integers(2))
            body += [f"V,{1000 + 2 * p},1", f"V,{1001 + 2 * p},1"] + extra
        _gz(d / M.FILES[split], head + "\n".join(body) + "\n")
    return d


def test_evaluate_end_to_end_on_toy_files(tmp_path):
    import yaml
    from pathlib import Path
    cfg = yaml.safe_load((Path(__file__).parents[1] / "conf/experiment/real_msweb.yaml").read_text())
    c = cfg["realdata"]
    c["dir"] = str(_toy_files(tmp_path, 0))
    c["model"].update(hidden=16, heads=2, layers=1, epochs=2, batch_size=16)
    c["personas"].update(ks=[2, 3], n_init=1)
    rows = M.evaluate(cfg)
    assert len([r for r in rows if r.metric == "Hit@5"]) == 3 * 4  # 3 scorers x 4 protocols
    pub = [r for r in rows if r.published is not None]
    assert sorted(r.published for r in pub) == [0.493, 0.596] and all("AllBut1" in r.protocol for r in pub)
    assert all(0 <= r.ours <= 1 for r in rows if r.metric == "Hit@5" and "Given5" not in r.protocol
               and "Given10" not in r.protocol)
    assert all(r.ours is None and "not run" in r.source for r in rows if "Given10" in r.protocol)  # <= 3 areas
    assert [r.metric for r in rows if r.metric.startswith("silhouette")] == ["silhouette (k=2)", "silhouette (k=3)"]
