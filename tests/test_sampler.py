"""TokenBudgetBatchSampler: coverage, budget, determinism, DDP evenness (fast, CPU, no GPU)."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from sessionbert.data.sampler import SeededBatchSampler, TokenBudgetBatchSampler, pack_sorted


def _lengths(n=2000, seed=0, cap=512):
    rng = np.random.default_rng(seed)
    return np.minimum(np.maximum(3, rng.lognormal(4.8, 0.8, n).astype(int)), cap)


def _flat(batches):
    return np.concatenate([np.asarray(b) for b in batches]) if batches else np.array([], dtype=int)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("pool", [None, 300])
def test_every_index_once_and_budget(shuffle, pool):
    lens = _lengths()
    s = TokenBudgetBatchSampler(lens, max_tokens=4096, shuffle=shuffle, seed=1, pool_size=pool)
    batches = list(s)
    assert len(batches) == len(s)
    assert np.array_equal(np.sort(_flat(batches)), np.arange(len(lens)))
    for b in batches:
        assert len(b) * lens[b].max() <= 4096
    # bucketing pays: far less padding than random batches of the same mean size
    pad = 1 - sum(lens[b].sum() for b in batches) / sum(len(b) * lens[b].max() for b in batches)
    assert pad < (0.1 if pool is None else 0.3)


def test_over_budget_example_goes_alone_and_max_sentences():
    lens = np.array([5, 5, 5, 5, 100, 7, 7])
    s = TokenBudgetBatchSampler(lens, max_tokens=20, shuffle=False, max_sentences=3)
    batches = list(s)
    assert [4] in batches
    assert all(len(b) <= 3 for b in batches)
    assert all(len(b) * lens[b].max() <= 20 for b in batches if b != [4])
    assert sorted(_flat(batches).tolist()) == list(range(7))


def test_pack_sorted_is_greedy():
    lens = np.array([1, 2, 2, 3, 4, 4, 10])
    assert pack_sorted(lens, 8).tolist() == [[0, 3], [3, 5], [5, 6], [6, 7]]


def test_deterministic_per_seed_and_epoch():
    lens = _lengths()
    a = TokenBudgetBatchSampler(lens, 4096, shuffle=True, seed=3)
    b = TokenBudgetBatchSampler(lens, 4096, shuffle=True, seed=3)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != e0
    a.set_epoch(0)
    assert list(a) == e0
    c = TokenBudgetBatchSampler(lens, 4096, shuffle=True, seed=4)
    assert list(c) != e0
    # unshuffled: fixed, shortest first
    u = TokenBudgetBatchSampler(lens, 4096, shuffle=False)
    u0 = list(u)
    u.set_epoch(5)
    assert list(u) == u0 and lens[u0[0]].max() <= lens[u0[-1]].min()


@pytest.mark.parametrize("replicas", [2, 3, 4, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_disjoint_equal_counts(replicas, drop_last):
    lens = _lengths(n=1001, seed=2)
    for epoch in (0, 1):
        per_rank = []
        for r in range(replicas):
            s = TokenBudgetBatchSampler(lens, 3000, shuffle=True, seed=0, num_replicas=replicas, rank=r,
                                        drop_last=drop_last)
            s.set_epoch(epoch)
            per_rank.append(list(s))
            assert len(per_rank[-1]) == len(s)
        counts = {len(p) for p in per_rank}
        assert len(counts) == 1 and counts.pop() > 0
        flat = [_flat(p) for p in per_rank]
        allidx = np.concatenate(flat)
        assert len(np.unique(allidx)) == len(allidx)  # disjoint, no duplicates
        for p in per_rank:
            assert all(len(b) * lens[b].max() <= 3000 for b in p)
        if not drop_last:  # batches are split, never dropped: every index exactly once over the ranks
            assert np.array_equal(np.sort(allidx), np.arange(len(lens)))


def test_tiny_dataset_more_replicas_than_examples():
    lens = np.array([10, 20])
    per_rank = [list(TokenBudgetBatchSampler(lens, 100, num_replicas=3, rank=r)) for r in range(3)]
    assert {len(p) for p in per_rank} == {1}
    assert set(_flat(sum(per_rank, [])).tolist()) == {0, 1}


def test_bad_arguments():
    with pytest.raises(ValueError):
        TokenBudgetBatchSampler([1, 2], 0)
    with pytest.raises(ValueError):
        TokenBudgetBatchSampler([1, 2], 10, num_replicas=2, rank=2)
    assert list(TokenBudgetBatchSampler([], 10)) == []


class _Toy(Dataset):
    def __init__(self, lens):
        self.lens = lens

    def __len__(self):
        return len(self.lens)

    def __getitem__(self, i):
        return {"idx": i, "input_ids": [2] + [7] * (int(self.lens[i]) - 2) + [3]}


def test_with_dataloader_and_mlm_collator():
    from sessionbert.data.datasets import MLMCollator

    lens = _lengths(n=300, seed=5, cap=128)
    s = TokenBudgetBatchSampler(lens, 2048, seed=0)
    dl = DataLoader(_Toy(lens), batch_sampler=s, collate_fn=MLMCollator(0, 4, 50, [0, 1, 2, 3, 4, 5]))
    seen = []
    for batch in dl:
        assert batch["input_ids"].numel() <= 2048
        assert torch.equal(batch["attention_mask"].sum(1), torch.as_tensor(lens[batch["idx"].numpy()]))
        seen += batch["idx"].tolist()
    assert sorted(seen) == list(range(300))


def test_replicas_resolved_lazily_without_process_group():
    s = TokenBudgetBatchSampler(_lengths(n=100), 2048)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert sorted(_flat(list(s)).tolist()) == list(range(100))


def test_lightning_advances_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    lens = _lengths(n=500)
    s = TokenBudgetBatchSampler(lens, 2048, seed=0)
    dl = DataLoader(_Toy(lens), batch_sampler=s, collate_fn=lambda b: b)
    e0 = list(s)
    _set_sampler_epoch(dl, 3)
    assert s.epoch == 3 and list(s) != e0


@pytest.mark.parametrize("make", [
    lambda: TokenBudgetBatchSampler(np.arange(1, 200) % 37 + 1, max_tokens=256, shuffle=True, seed=5),
    lambda: SeededBatchSampler(199, 16, shuffle=True, seed=5),
])
def test_resume_skips_exactly_the_batches_done(make):
    """After resume_from(epoch, k) the sampler yields the rest of that epoch (nothing lost or replayed), the full
    epoch length is still reported, and later epochs are untouched."""
    ref = make()
    ref.set_epoch(1)
    full1 = list(ref)
    ref.set_epoch(2)
    full2 = list(ref)
    s = make()
    s.set_epoch(1)
    s.resume_from(1, 3)
    assert list(s) == full1[3:] and list(s) == full1[3:], "every iterator of the resumed epoch skips"
    assert len(s) == len(full1)
    s.set_epoch(2)
    assert list(s) == full2


def test_seeded_batch_sampler_covers_and_deals_to_ranks():
    s = SeededBatchSampler(50, 8, shuffle=True, seed=0)
    got = [i for b in s for i in b]
    assert sorted(got) == list(range(50)) and len(s) == 7
    s.set_epoch(1)
    assert [i for b in s for i in b] != got, "a new order per epoch"
    ranks = [SeededBatchSampler(50, 8, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0]) == 4
    assert set(i for r in ranks for b in r for i in b) == set(range(50)), "no example dropped across ranks"
