"""WordPiece tokenizer trained on the training split's serialised sessions (HF `tokenizers`), saved in HF format."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .serialize import SPECIAL_TOKENS

log = logging.getLogger(__name__)


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> tuple[PreTrainedTokenizerFast, dict]:
    """Train a BERT-style WordPiece tokenizer. Returns the tokenizer and a note on the vocabulary actually reached.

    WordPiece stops growing when no pair is frequent enough, so a small corpus yields fewer tokens than asked:
    that cap is what "the corpus supports" and is reported, never silently ignored.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", additional_special_tokens=["[EVT]"],
    )
    reached = tok.get_vocab_size()
    note = {"vocab_size_requested": vocab_size, "vocab_size": reached, "capped_by_corpus": reached < vocab_size}
    if reached < vocab_size:
        log.info("tokenizer: asked for %d tokens, the corpus supports %d (WordPiece ran out of pairs)", vocab_size, reached)
    return fast, note


def _batches(texts: Iterable[str], size: int = 4096) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    p = Path(path)
    if not (p / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {p}")
    return PreTrainedTokenizerFast.from_pretrained(str(p))
