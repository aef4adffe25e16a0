"""Token-budget length-bucketing batch sampler for MLM pretraining.

Sessions vary a lot in length (simulator: median 124 tokens, 1% at the 512 cap; MSNBC: median 18). A
fixed batch size padded to the longest session of the batch spends most of the GPU on [PAD] slots, and
its step cost swings with the longest session drawn. Here examples of similar length are grouped and each
batch holds as many sessions as fit a *token budget*: ``len(batch) * max(length in batch) <= max_tokens``,
so padding is small and every step costs about the same.

Why our own and not an existing one: the idea is the well-known one (fairseq's ``batch_by_size`` with
``max_tokens``, Hugging Face's ``group_by_length`` / ``LengthGroupedSampler``), but HF's sampler groups for
a *fixed batch size* (no token budget), fairseq's is not a torch ``BatchSampler`` we can hand to a
DataLoader without pulling in fairseq, and neither gives DDP ranks the *same number of batches* without
duplicating or dropping examples. Distributed training needs that: a rank with one batch more hangs in the
all-reduce of its extra step. This sampler makes the batch count divisible by the number of replicas by
splitting batches (which only lowers their padded size), so every index is still seen exactly once per
epoch across ranks.

Per epoch (``set_epoch``), with ``shuffle``: indices are permuted with ``np.random.default_rng([seed,
epoch])``, sorted by length in pools of ``pool_size`` examples (stable sort, so equal lengths keep the random
order), packed greedily into token-budget batches, and the batch order is shuffled. Without ``shuffle``,
indices are sorted by length (ties by index) and batches come shortest first: the least padding, for
evaluation. Everything is a pure function of (lengths, arguments, epoch): deterministic across processes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def pack_sorted(lengths: np.ndarray, max_tokens: int, max_sentences: int | None = None) -> list[np.ndarray]:
    """Greedy packing of positions 0..n-1 of ascending `lengths` into consecutive runs with
    ``run_len * lengths[last] <= max_tokens`` (and ``run_len <= max_sentences``). An example longer than
    the budget forms a batch of its own. Returns (start, end) pairs as an (n_batches, 2) int array."""
    n = len(lengths)
    cap = max_sentences or n
    bounds, s = [], 0
    while s < n:
        # the run s..e has cost (e - s + 1) * lengths[e], increasing in e as lengths ascend
        kmax = max(1, min(cap, n - s, max_tokens // max(1, int(lengths[s]))))
        k = np.arange(1, kmax + 1)
        ok = k * lengths[s : s + kmax] <= max_tokens
        take = int(k[ok][-1]) if ok.any() else 1  # a single over-budget example goes alone
        bounds.append((s, s + take))
        s += take
    return np.asarray(bounds, dtype=np.int64).reshape(-1, 2)


class _ResumableEpochs:
    """Mid-epoch resume for a batch sampler whose epoch order is a pure function of (seed, epoch).

    ``resume_from(epoch, batches_done)`` (called by ``train_utils.ResumeState`` when a checkpoint is loaded) makes
    every iterator created while the sampler is at that epoch skip the batches already trained, so the resumed run
    sees exactly the rest of the interrupted epoch: no batch lost or replayed. ``len()`` stays the full epoch's
    count, which is what Lightning's loop expects on a mid-epoch restart (it adds the batches already done to its
    fetch counter). Later epochs are not affected."""

    epoch: int
    _resume: tuple[int, int] | None = None
    _replicas_arg: int | None = None
    _rank_arg: int | None = None

    @property
    def num_replicas(self) -> int:
        if self._replicas_arg is not None:
            return int(self._replicas_arg)
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank_arg is not None:
            r = int(self._rank_arg)
        else:
            import torch.distributed as dist

            r = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= r < self.num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got {r}, {self.num_replicas}")
        return r

    def resume_from(self, epoch: int, batches_done: int) -> None:
        self._resume = (int(epoch), int(batches_done))

    def _skip(self) -> int:
        if self._resume is not None and self._resume[0] == self.epoch:
            return self._resume[1]
        return 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self._resume is not None and self.epoch > self._resume[0]:
            self._resume = None


class _EpochHook:
    """Exposed as ``batch_sampler.sampler``: Lightning's ``_set_sampler_epoch`` calls ``set_epoch`` on
    ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``, never on the batch sampler itself."""

    def __init__(self, owner: "TokenBudgetBatchSampler"):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self._owner.num_examples


class TokenBudgetBatchSampler(_ResumableEpochs, Sampler[list[int]]):
    """Batches of dataset indices with ``len(batch) * max(lengths[batch]) <= max_tokens``.

    lengths: per-example token counts *as the collator will see them* (after truncation to seq_len).
    max_tokens: padded slots per batch (B x T); an example longer than it forms a batch of its own.
    shuffle, seed: random grouping and batch order per epoch (``set_epoch``), deterministic per (seed, epoch).
    drop_last: with several replicas, drop the surplus batches (the last ones of the epoch's order) instead of
        splitting batches until the count divides ``num_replicas``. Ignored with one replica.
    num_replicas, rank: DDP; when not given, read from torch.distributed at iteration time (1 and 0 when no
        process group is initialised). Every rank gets the same number of batches; ranks' indices are disjoint.
        With Lightning, build the DataLoader with ``batch_sampler=`` this and pass
        ``Trainer(use_distributed_sampler=False)`` so Lightning does not try to replace it.
    pool_size: examples sorted together (None: the whole dataset, least padding; smaller pools mix lengths
        more across epochs at some padding cost).
    max_sentences: optional cap on examples per batch.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, max_tokens: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None,
                 pool_size: int | None = None, max_sentences: int | None = None):
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(self.lengths) and self.lengths.min() < 0:
            raise ValueError("lengths must be non-negative")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {pool_size}")
        if max_sentences is not None and max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1 or None, got {max_sentences}")
        if num_replicas is not None and rank is not None and (num_replicas < 1 or not 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.max_tokens, self.shuffle, self.seed, self.drop_last = int(max_tokens), shuffle, int(seed), drop_last
        # resolved at first use when not given: a DataLoader is often built before the process group exists
        self._replicas_arg, self._rank_arg = num_replicas, rank
        self.pool_size, self.max_sentences = pool_size, max_sentences
        self.epoch = 0
        self.sampler = _EpochHook(self)  # so that Lightning advances the epoch (see _EpochHook)
        self._cache: tuple[tuple[int, int, int], list[np.ndarray]] | None = None

    # ---------------------------------------------------------------------------------------------- internals
    def _all_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches over all ranks, in order, before they are dealt to ranks."""
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pool = self.pool_size or max(1, n)
        batches: list[np.ndarray] = []
        for p0 in range(0, n, pool):
            idx = order[p0 : p0 + pool]
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
            for s, e in pack_sorted(self.lengths[idx], self.max_tokens, self.max_sentences):
                batches.append(idx[s:e])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return self._even(batches, rng)

    def _even(self, batches: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        r = self.num_replicas
        if r == 1 or len(batches) % r == 0:
            return batches
        if self.drop_last:
            return batches[: len(batches) - len(batches) % r]
        need = r - len(batches) % r
        # split the batches with the most padded slots first; halves keep their (sorted) lengths, so the budget holds
        cost = np.array([len(b) * (self.lengths[b].max() if len(b) else 0) for b in batches])
        splittable = [i for i in np.argsort(-cost, kind="stable") if len(batches[i]) >= 2]
        for i in sorted(splittable[:need], reverse=True):
            b = batches[i]
            h = len(b) // 2
            batches[i : i + 1] = [b[:h], b[h:]]
        if len(batches) % r:  # too few examples to split (e.g. fewer than num_replicas): repeat batches
            extra = r - len(batches) % r
            batches = batches + [batches[i % len(batches)] for i in range(extra)] if batches else batches
        return batches

    def _rank_batches(self) -> list[np.ndarray]:
        key = (self.epoch, self.num_replicas, self.rank)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._all_batches(self.epoch)[self.rank :: self.num_replicas])
        return self._cache[1]

    # ------------------------------------------------------------------------------------------------- API
    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._rank_batches()[self._skip():]:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self._rank_batches())


class SeededBatchSampler(_ResumableEpochs, Sampler[list[int]]):
    """Fixed-size batches of a per-epoch permutation drawn from ``np.random.default_rng([seed, epoch])``.

    torch's ``DataLoader(shuffle=True)`` draws its permutation from the global RNG when the iterator is created,
    so a run resumed mid-epoch cannot reproduce the rest of the interrupted epoch. Here the order is a pure function
    of (seed, epoch) and the sampler skips the batches already trained after a resume (``resume_from``).
    With several replicas (DDP) batches are dealt round-robin; when their count does not divide the number of
    replicas the first batches are repeated (like torch's DistributedSampler pads with repeated examples), so every
    rank runs the same number of steps and no example is dropped."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = int(n), int(batch_size), shuffle, int(seed), drop_last
        self._replicas_arg, self._rank_arg = num_replicas, rank
        self.epoch = 0
        self.sampler = _EpochHook(self)

    @property
    def num_examples(self) -> int:
        return self.n

    def _batches(self) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        batches = [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]
        r = self.num_replicas
        if r > 1 and batches and len(batches) % r:
            batches += [batches[i % len(batches)] for i in range(r - len(batches) % r)]
        return batches[self.rank :: r]

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches()[self._skip():]:
            yield b.tolist()

    def __len__(self) -> int:
        b = self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return -(-b // self.num_replicas)
