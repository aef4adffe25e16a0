"""Unit invariants: masking, serialisation/truncation, targets never in the input, metrics vs hand values,
the recommender never returning a used service."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sessionbert.data.corpus import Corpus, LabelMaps
from sessionbert.data.datasets import MLMCollator, SessionDataset
from sessionbert.data.serialize import SessionEncoder
from sessionbert.data.tokenizer import train_wordpiece
from sessionbert.recommend.baselines import group_popularity_recs, popularity_recs
from sessionbert.recommend.metrics import hit_at_k
from sessionbert.recommend.recommender import recommend


def toy_events(n_users: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    services = [f"svc{i}" for i in range(10)]
    rows, sid, t0 = [], 0, pd.Timestamp("2024-01-01", tz="UTC")
    for u in range(n_users):
        fav = rng.choice(10, 3, replace=False)
        for _ in range(int(rng.integers(4, 10))):
            start, sid = t0 + pd.Timedelta(days=float(rng.uniform(0, 120))), sid + 1
            for e in range(int(rng.integers(2, 14))):
                sv = services[int(rng.choice(fav))]
                pg = f"{sv}/p{int(rng.integers(4))}"
                rows.append((f"u{u}", f"s{sid}", start + pd.Timedelta(minutes=e), sv, pg, f"page {pg}", "open", "eu"))
    return pd.DataFrame(rows, columns=["user_id", "session_id", "timestamp", "service", "page", "page_title",
                                       "action", "region"])


@pytest.fixture(scope="module")
def corpus_tok():
    c = Corpus.build(toy_events(), None, 14, 28)
    tok, _ = train_wordpiece(c.train_texts(), 400)
    return c, tok


def test_masking_invariants(corpus_tok):
    c, tok = corpus_tok
    enc_obj = SessionEncoder(tok, 64)
    enc = c.encode(enc_obj)
    s = np.arange(len(c.sessions))
    ds = SessionDataset(enc_obj, enc, np.stack([s, -np.ones_like(s)], 1))
    coll = MLMCollator(tok.pad_token_id, tok.mask_token_id, len(tok), tok.all_special_ids, 0.15)
    torch.manual_seed(0)
    batch = coll([ds[i] for i in range(len(ds))])
    from sessionbert.data.datasets import pad_batch

    plain = pad_batch([ds[i] for i in range(len(ds))], tok.pad_token_id)["input_ids"]
    labels, inputs = batch["labels"], batch["input_ids"]
    special = torch.isin(plain, torch.tensor(tok.all_special_ids))
    target = labels != -100
    assert not (target & special).any(), "special tokens or padding became MLM targets"
    assert torch.equal(labels[target], plain[target]), "labels must be the original tokens"
    assert torch.equal(inputs[~target], plain[~target]), "non-target tokens must be untouched"
    rate = target.sum().item() / (~special).sum().item()
    assert 0.12 < rate < 0.18
    masked = (inputs[target] == tok.mask_token_id).float().mean().item()
    kept = (inputs[target] == plain[target]).float().mean().item()
    assert 0.75 < masked < 0.85 and 0.05 < kept < 0.16
    assert not torch.isin(inputs[target & (inputs != tok.mask_token_id) & (inputs != plain)],
                          torch.tensor(tok.all_special_ids)).any(), "random replacements must not be specials"


def test_masking_eval_masks_fixed_per_example(corpus_tok):
    c, tok = corpus_tok
    enc_obj = SessionEncoder(tok, 64)
    enc = c.encode(enc_obj)
    s = np.arange(10)
    ds = SessionDataset(enc_obj, enc, np.stack([s, -np.ones_like(s)], 1))
    coll = MLMCollator(tok.pad_token_id, tok.mask_token_id, len(tok), tok.all_special_ids, 0.15, fixed_seed=3)
    a = coll([ds[i] for i in range(10)])
    b = coll([ds[i] for i in range(10)])
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMCollator(0, 4, 100, [0, 1, 2, 3, 4], prob=1.5)


def test_truncation_keeps_metadata_and_most_recent_events(corpus_tok):
    c, tok = corpus_tok
    long = int(np.argmax(c.sessions["n_events"].to_numpy()))
    full = SessionEncoder(tok, 512)
    short = SessionEncoder(tok, 24)
    ids_full = full.build(c.encode(full), long)
    ids_short = short.build(c.encode(short), long)
    assert len(ids_short) <= 24 and ids_short[0] == tok.cls_token_id and ids_short[-1] == tok.sep_token_id
    meta = c.encode(full).meta_ids[long]
    assert ids_short[1 : 1 + len(meta)] == meta, "metadata comes first and survives truncation"
    body = ids_short[1 + len(meta) : -1]
    assert body[0] == short.sep_id, "truncation happens at an event boundary"
    assert ids_full[-1 - len(body) : -1] == body, "the most recent events are the ones kept"


def test_targets_never_visible_in_input(corpus_tok):
    c, tok = corpus_tok
    labels = LabelMaps.from_corpus(c)
    items, page_y, service_y = c.prefix_examples("test", labels, None, seed=0)
    enc_obj = SessionEncoder(tok, 512)
    enc = c.encode(enc_obj)
    for (s, n), py in zip(items[:200], page_y[:200]):
        ids = enc_obj.build(enc, int(s), int(n))
        events_in = ids.count(enc_obj.sep_id)
        assert events_in == n, "the input holds exactly the prefix's events"
        target_row = c.bounds[s] + n
        assert labels.pages[py] == c.events["page"].iloc[target_row] or py == 0
        # the input equals the serialisation of the first n events: the target event is not in it
        nxt = enc_obj.build(enc, int(s), int(n) + 1)
        assert ids[:-1] == nxt[: len(ids) - 1]


def test_hit_at_k_hand_computed():
    recs = {"a": ["x", "y", "z"], "b": ["y"], "c": ["q"]}
    targets = {"a": {"z"}, "b": {"x"}, "c": {"q"}, "d": {"x"}}  # d has no recs: a miss
    assert hit_at_k(recs, targets, k=5) == pytest.approx(2 / 4)
    assert hit_at_k(recs, targets, k=2) == pytest.approx(1 / 4)


def test_popularity_baselines_hand_computed():
    used = {"a": {"x", "y"}, "b": {"x"}, "c": {"x", "z"}, "d": {"w"}}
    assert popularity_recs(used, ["b"], k=2)["b"] == ["w", "y"]  # x used; ties (1 user each) by name
    group = {"a": "g1", "b": "g1", "c": "g2", "d": "g2"}
    assert group_popularity_recs(used, group, ["b"], k=1)["b"] == ["y"]


def test_recommender_never_returns_used_service_and_counts():
    services = ["[OTHER]", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(services)), size=30)
    users = [f"u{i % 5}" for i in range(30)]
    used = {f"u{i}": {"s1", "s2"} for i in range(5)}
    for mode in ("after_topk", "before_topk"):
        for ranker in ("count", "prob"):
            recs = recommend(users, probs, services, used, per_session_k=5, k=5, ranker=ranker, filter_used=mode)
            for u, r in recs.items():
                names = [s for s, _, _ in r]
                assert not set(names) & used[u] and "[OTHER]" not in names and len(names) <= 5
    # hand example: counts decide, ties by summed probability
    p = np.array([[0, .5, .3, .2, 0, 0, 0, 0], [0, .1, .5, .0, .4, 0, 0, 0], [0, 0, 0, .6, .4, 0, 0, 0]])
    r = recommend(["u"] * 3, p, services, {"u": set()}, per_session_k=2, k=3)["u"]
    assert [s for s, _, _ in r] == ["s2", "s4", "s3"] and [c for _, c, _ in r] == [2, 2, 1]
    r2 = recommend(["u"] * 3, p, services, {"u": {"s2"}}, per_session_k=2, k=3)["u"]
    assert [s for s, _, _ in r2] == ["s4", "s3", "s1"]  # top-2 first, then s2 dropped; ties by summed prob


def test_pad_to_multiple_rounds_width_and_masks_padding():
    from sessionbert.data.datasets import pad_batch

    b = pad_batch([{"idx": 0, "input_ids": [2, 7, 8, 3]}, {"idx": 1, "input_ids": [2, 9, 3]}], pad_id=0, multiple=32)
    assert b["input_ids"].shape == (2, 32)
    assert b["attention_mask"].sum(1).tolist() == [4, 3]
    assert pad_batch([{"idx": 0, "input_ids": [2, 3]}], pad_id=0)["input_ids"].shape == (1, 2)


def test_gradient_clipping_with_fused_optimizer_under_bf16():
    """Lightning refuses to clip for a fused optimizer under bf16-mixed (the GPU default); our modules clip
    themselves, and the gradients really are clipped."""
    import lightning as L
    import torch

    from sessionbert.models.encoder import ARCHS, bert_config
    from sessionbert.models.modules import MLMModule

    cfg = bert_config(50, 0, ARCHS["tiny"], 64, 0.0)
    module = MLMModule(cfg.to_dict(), lr=1e-3)
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    norms = []
    orig = module.configure_gradient_clipping

    def spy(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        orig(optimizer, gradient_clip_val, gradient_clip_algorithm)
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))

    module.configure_gradient_clipping = spy
    ids = torch.randint(6, 50, (4, 12))
    labels = torch.where(torch.rand(4, 12) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1e-3, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch, batch], batch_size=None))
    assert len(norms) == 2 and all(float(n) <= 1e-3 * 1.01 for n in norms)


def _recommend_reference(session_users, service_probs, services, used, per_session_k, k, ranker, filter_used):
    """The paper's recommender as a plain loop (what rank_new_services vectorises)."""
    from collections import defaultdict

    names = np.asarray(services, dtype=object)
    valid = np.array([not s.startswith("[") for s in names])
    probs = np.where(valid[None, :], service_probs, -np.inf)
    count, mass, by_user = defaultdict(lambda: defaultdict(int)), defaultdict(lambda: defaultdict(float)), defaultdict(list)
    for i, u in enumerate(session_users):
        by_user[u].append(i)
    out = {}
    for u, rows in by_user.items():
        seen = used.get(u, set())
        p = probs[rows]
        if filter_used == "before_topk":
            p = np.where(np.isin(names, list(seen))[None, :], -np.inf, p)
        for r, cols in enumerate(np.argsort(-p, axis=1, kind="stable")[:, :per_session_k]):
            for c in cols:
                if names[c] in seen or not np.isfinite(p[r, c]):
                    continue
                count[u][names[c]] += 1
                mass[u][names[c]] += float(service_probs[rows[r], c])
        cand = sorted(count[u], key=(lambda s: (-count[u][s], -mass[u][s], s)) if ranker == "count"
                      else (lambda s: (-mass[u][s], s)))
        out[u] = [(s, count[u][s], mass[u][s]) for s in cand[:k]]
    return out


def test_vectorised_recommender_equals_the_loop_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(150):
        C = int(rng.integers(2, 12))
        services = ["[OTHER]"] + [f"s{rng.integers(0, 100)}_{i}" for i in range(C - 1)]
        S = int(rng.integers(1, 60))
        users = [f"u{rng.integers(0, 6)}" for _ in range(S)]
        probs = rng.dirichlet(np.ones(C), size=S).astype(np.float32)
        if trial % 3 == 0:
            probs = np.round(probs, 1).astype(np.float32)  # many exact ties
        used = {f"u{i}": set(rng.choice(services, size=int(rng.integers(0, C)), replace=False)) for i in range(6)}
        for ranker in ("count", "prob"):
            for mode in ("after_topk", "before_topk"):
                pk, k = int(rng.integers(1, 6)), int(rng.integers(1, 6))
                assert recommend(users, probs, services, used, pk, k, ranker, mode) == \
                    _recommend_reference(users, probs, services, used, pk, k, ranker, mode)


def test_length_batches_and_pad_rows():
    from sessionbert.score import length_batches, pad_rows

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=500)
    batches = length_batches(lengths, 2048)
    allrows = np.concatenate(batches)
    assert sorted(allrows.tolist()) == list(range(500))
    for b in batches:
        assert len(b) * lengths[b].max() <= 2048 or len(b) == 1
    # greedy: the next row would not have fitted
    for b, nxt in zip(batches[:-1], batches[1:]):
        assert (len(b) + 1) * max(lengths[b].max(), lengths[nxt[0]]) > 2048
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(5, 100, size=int(offsets[-1])).astype(np.int32)
    x, m = pad_rows(ids, offsets, batches[3], pad_id=0)
    for r, row in enumerate(batches[3]):
        n = lengths[row]
        assert (x[r, :n] == ids[offsets[row]:offsets[row + 1]]).all() and (x[r, n:] == 0).all()
        assert m[r].sum() == n


def test_event_texts_built_per_distinct_combination_equal_row_by_row():
    from sessionbert.data.serialize import _event_texts, event_texts

    ev = toy_events(300, seed=3)
    assert len(ev) > 10_000  # many rows, each combination repeated
    ev.loc[ev.index[::7], "page_title"] = None
    ev.loc[ev.index[::5], "action"] = None
    ev = ev.sample(frac=1.0, random_state=0)  # any row order, any index
    got, want = event_texts(ev), _event_texts(ev)
    assert got.index.equals(want.index)
    assert (got.astype(object).to_numpy() == want.astype(object).to_numpy()).all()


def test_tokenizer_sample_is_seeded_and_bounded():
    c = Corpus.build(toy_events(), None, 14, 28)
    n = len(c.window_sessions("train"))
    assert list(c.train_texts(n + 5)) == list(c.train_texts())  # fewer sessions than the cap: all, same order
    a, b = list(c.train_texts(7, seed=1)), list(c.train_texts(7, seed=1))
    assert len(a) == 7 and a == b and set(a) <= set(c.train_texts())
    assert list(c.train_texts(7, seed=2)) != a


def test_used_and_adopted_rule_by_hand():
    """Used = any event before the test window; adopted = first used inside it, only for users seen before; the same
    with a categorical service column (unobserved categories are not adoptions)."""
    import pandas as pd

    from sessionbert.data.split import TimeSplit, used_and_adopted

    ts = pd.Timestamp
    split = TimeSplit(start=ts("2024-01-01", tz="UTC"), val_start=ts("2024-02-01", tz="UTC"),
                      test_start=ts("2024-03-01", tz="UTC"), end=ts("2024-04-01", tz="UTC"))
    rows = [("a", "s1", "2024-01-05"), ("a", "s1", "2024-03-05"), ("a", "s2", "2024-03-06"),
            ("b", "s3", "2024-03-02"),  # nothing before the window: cannot be recommended to
            ("c", "s1", "2024-02-10"), ("c", "s1", "2024-03-10"),  # only a service used before
            ("d", "s2", "2024-03-20"), ("d", "s3", "2024-01-20"), ("d", "s2", "2024-03-21")]
    ev = pd.DataFrame(rows, columns=["user_id", "service", "timestamp"])
    ev["timestamp"] = pd.to_datetime(ev["timestamp"], utc=True)
    want = ({"a": {"s1"}, "c": {"s1"}, "d": {"s3"}}, {"a": {"s2"}, "d": {"s2"}})
    assert used_and_adopted(ev, split) == want
    cat = ev.astype({"service": pd.CategoricalDtype(["s1", "s2", "s3", "s4"])})
    assert used_and_adopted(cat, split) == want


def test_corpus_build_skips_its_sort_only_for_rows_already_in_order(monkeypatch):
    """`in_session_order` on (user, session start, session, time), ties included; Corpus.build of shuffled rows, of
    sorted rows (sort skipped) and of sorted rows with the sort forced are the same Corpus."""
    import pandas as pd

    from sessionbert.data import corpus as C

    u = pd.Series(["a", "a", "a", "b", "b"])
    st = pd.Series(pd.to_datetime([1, 1, 1, 0, 5], unit="s", utc=True))
    s = pd.Series(["s1", "s1", "s2", "s3", "s4"])
    ts = pd.Series(pd.to_datetime([1, 2, 1, 0, 5], unit="s", utc=True))
    assert C.in_session_order(u, st, s, ts)  # equal starts ordered by session id, then time
    assert not C.in_session_order(u, st, s, ts.iloc[[1, 0, 2, 3, 4]].reset_index(drop=True))  # time back in s1
    assert not C.in_session_order(u.iloc[::-1].reset_index(drop=True), st, s, ts)  # users out of order
    assert not C.in_session_order(u, st, pd.Series(["s2", "s2", "s1", "s3", "s4"]), ts)  # same start: id order
    assert not C.in_session_order(pd.Series(["a", None, "a", "b", "b"]), st, s, ts)  # missing: the sort decides

    ev = toy_events(200, seed=4)
    base = C.Corpus.build(ev, None, 14, 28)
    assert C.in_session_order(base.events["user_id"], base.events.groupby("session_id")["timestamp"].transform("min"),
                              base.events["session_id"], base.events["timestamp"])
    shuffled = C.Corpus.build(ev.sample(frac=1.0, random_state=1), None, 14, 28)
    again = C.Corpus.build(base.events, None, 14, 28)  # already in order: no sort
    monkeypatch.setattr(C, "in_session_order", lambda *a: False)
    forced = C.Corpus.build(base.events, None, 14, 28)
    for c in (shuffled, again, forced):
        pd.testing.assert_frame_equal(c.events, base.events)
        pd.testing.assert_frame_equal(c.sessions, base.sessions)
        assert c.meta == base.meta and (c.bounds == base.bounds).all()
