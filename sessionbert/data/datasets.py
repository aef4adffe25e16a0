"""Torch datasets over encoded sessions: whole sessions for MLM, session prefixes for next-page/next-service."""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from .serialize import Encoded, SessionEncoder


class SessionDataset(Dataset):
    """Item i: the first items[i, 1] events of session items[i, 0] (all events when -1), with optional targets.

    Targets are the page and service of the event *after* the prefix; that event is never part of the input.
    """

    def __init__(
        self,
        encoder: SessionEncoder,
        enc: Encoded,
        items: np.ndarray,  # (N, 2) int: session index, prefix length (-1 = whole session)
        page_y: np.ndarray | None = None,  # (N,) int class index of the next page
        service_y: np.ndarray | None = None,  # (N,) int class index of the next service
    ):
        self.encoder, self.enc, self.items = encoder, enc, np.asarray(items, dtype=np.int64)
        self.page_y, self.service_y = page_y, service_y

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        s, n = self.items[i]
        out = {"idx": i, "input_ids": self.encoder.build(self.enc, int(s), None if n < 0 else int(n))}
        if self.page_y is not None:
            out["page"] = int(self.page_y[i])
            out["service"] = int(self.service_y[i])
        return out


class IdsDataset(Dataset):
    """Item i: the token ids ids[offsets[i]:offsets[i + 1]] of one whole session, already built (the streaming
    prep's shards, `pipeline.shard_ids`): what `SessionDataset` yields for whole sessions, without the corpus."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = np.asarray(ids), np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        return {"idx": i, "input_ids": self.ids[self.offsets[i]:self.offsets[i + 1]]}

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def pad_batch(batch: list[dict], pad_id: int, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest sequence in the batch, rounded up to `multiple` when given (few distinct
    batch shapes: on a GPU every new shape costs kernel selection and allocator work)."""
    width = max(len(b["input_ids"]) for b in batch)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    for r, b in enumerate(batch):
        ids[r, : len(b["input_ids"])] = torch.as_tensor(b["input_ids"], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": (ids != pad_id).long(), "idx": torch.tensor([b["idx"] for b in batch])}
    if "page" in batch[0]:
        out["page"] = torch.tensor([b["page"] for b in batch])
        out["service"] = torch.tensor([b["service"] for b in batch])
    return out


class PadCollator:
    """`pad_batch` with an optional width multiple. `count`: also put the batch's real (non-pad) token count and
    its padded slots (B x T) in the batch as plain ints, "real_tokens" and "padded_slots" (Lightning moves only
    tensors to the device, so a callback reads them without a device sync; see train_utils.TokenCounter)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, count: bool = False):
        self.pad_id, self.multiple, self.count = pad_id, pad_to_multiple_of, count

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = pad_batch(batch, self.pad_id, self.multiple)
        if self.count:
            out["real_tokens"] = sum(len(b["input_ids"]) for b in batch)
            out["padded_slots"] = int(out["input_ids"].numel())
        return out


class MLMCollator:
    """BERT masking: `prob` of the maskable tokens become targets; of those 80% [MASK], 10% random, 10% kept.

    Special tokens ([CLS], [SEP], [EVT], [PAD]) are never targets. The masks never come from the global RNG, so
    they do not depend on the number of data-loader workers, on prefetching, or on where a resumed run restarts:
    - training (`fixed_seed` None): one generator per batch, seeded by (`seed`, the batch's example indices in
      order); the sampler's order is a pure function of (seed, epoch), so an interrupted and resumed run sees the
      same masks as an uninterrupted one (tests/test_reliability.py::test_resume_kill9_bit_identical);
    - evaluation (`fixed_seed` set): each example's mask depends only on (fixed_seed, example index), so
      validation losses are comparable across epochs and runs.
    """

    def __init__(self, pad_id: int, mask_id: int, vocab_size: int, special_ids: list[int], prob: float = 0.15,
                 fixed_seed: int | None = None, pad_to_multiple_of: int | None = None, seed: int = 0):
        if not 0.0 < prob < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {prob}")
        self.pad_id, self.mask_id, self.vocab_size, self.prob = pad_id, mask_id, vocab_size, prob
        self.special = torch.tensor(sorted(set(special_ids) | {pad_id}))
        self.fixed_seed, self.seed = fixed_seed, int(seed)
        self.multiple = pad_to_multiple_of
        # random replacements are drawn from non-special tokens only
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[self.special[self.special < vocab_size]] = False
        self.random_pool = keep.nonzero().squeeze(1)

    def _rand(self, batch: dict, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fixed_seed is None:
            idx = batch["idx"].numpy().astype(np.int64)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(idx.tobytes()))
            return (torch.rand(shape, generator=g), torch.rand(shape, generator=g),
                    torch.randint(len(self.random_pool), shape, generator=g))
        rows = []
        for i in batch["idx"].tolist():
            g = torch.Generator().manual_seed(self.fixed_seed * 1_000_003 + i)
            rows.append((torch.rand(shape[1], generator=g), torch.rand(shape[1], generator=g),
                         torch.randint(len(self.random_pool), (shape[1],), generator=g)))
        return tuple(torch.stack(x) for x in zip(*rows))  # type: ignore[return-value]

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(items, self.pad_id, self.multiple)
        ids = batch["input_ids"]  # (B, T)
        u_select, u_kind, r_tok = self._rand(batch, tuple(ids.shape))
        maskable = ~torch.isin(ids, self.special)
        target = maskable & (u_select < self.prob)
        labels = torch.where(target, ids, torch.full_like(ids, -100))
        inputs = ids.clone()
        inputs[target & (u_kind < 0.8)] = self.mask_id
        rnd = target & (u_kind >= 0.8) & (u_kind < 0.9)
        inputs[rnd] = self.random_pool[r_tok[rnd]]
        batch["input_ids"], batch["labels"] = inputs, labels
        return batch


class PackedMLMCollator:
    """The batch of `MLMCollator` (same masks, so packed and padded training see the same targets), packed end to
    end for `models.packed.packed_hidden`: no padding between sessions, attention kept inside each session.

    Output: input_ids / position_ids (N,), cu_seqlens (B+1,) int32 session offsets, mlm_positions / mlm_labels (M,)
    the masked positions in the stream and their targets (the decoder runs on exactly these rows: a fixed index
    built here, so the GPU never waits for a boolean-mask count), max_len (int: the kernel's length bound),
    mlm_count (int: the masked positions, mlm_positions[:mlm_count], sorted), mlm_cu_seqlens (B+1,) int32 and
    mlm_max_len (int): each session's range of them and the most in one session (`models.packed.QueryRows`: the last
    layer's attention queries), idx, and real_tokens / padded_slots (ints, see PadCollator). N is rounded up to `multiple` and M to
    `label_multiple` (few distinct shapes); the filler is extra sessions of [PAD] of at most `max_len` tokens
    whose positions are never targets (label -100, ignored by the loss)."""

    def __init__(self, mlm: MLMCollator, max_len: int, multiple: int = 1024, label_multiple: int = 256):
        if mlm.multiple:
            raise ValueError("PackedMLMCollator: the inner MLMCollator must not pad to a multiple (packing has no width)")
        self.mlm, self.max_len, self.multiple, self.label_multiple = mlm, int(max_len), int(multiple), int(label_multiple)

    def __call__(self, items: list[dict]) -> dict:
        b = self.mlm(items)
        valid = b["attention_mask"].bool()  # (B, T)
        lens = valid.sum(1)
        if int(lens.max()) > self.max_len:
            raise ValueError(f"PackedMLMCollator: a session of {int(lens.max())} tokens exceeds max_len {self.max_len}")
        ids, labels = b["input_ids"][valid], b["labels"][valid]  # (n,), row-major: sessions in order
        pos = torch.arange(valid.shape[1]).expand_as(valid)[valid]
        n = len(ids)
        total = -(-n // self.multiple) * self.multiple
        fill = total - n
        fill_lens = [self.max_len] * (fill // self.max_len) + ([fill % self.max_len] if fill % self.max_len else [])
        seg = torch.cat([lens, torch.tensor(fill_lens, dtype=lens.dtype)])
        cu = torch.zeros(len(seg) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(seg, 0)
        if fill:
            ids = torch.cat([ids, torch.full((fill,), self.mlm.pad_id, dtype=ids.dtype)])
            pos = torch.cat([pos] + [torch.arange(k) for k in fill_lens])
        sel = (labels != -100).nonzero().squeeze(1)
        m = max(self.label_multiple, -(-len(sel) // self.label_multiple) * self.label_multiple)
        mlm_pos = torch.zeros(m, dtype=torch.long)
        mlm_lab = torch.full((m,), -100, dtype=torch.long)
        mlm_pos[: len(sel)], mlm_lab[: len(sel)] = sel, labels[sel]
        cu_q = torch.searchsorted(sel, cu.long()).to(torch.int32)  # sel is sorted: each session's masked range
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if len(cu_q) > 1 else 0
        return {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "mlm_positions": mlm_pos,
                "mlm_labels": mlm_lab, "max_len": self.max_len, "mlm_count": len(sel), "mlm_cu_seqlens": cu_q,
                "mlm_max_len": max_q, "idx": b["idx"], "real_tokens": n, "padded_slots": total}
