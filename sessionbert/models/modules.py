"""LightningModules: MLM pretraining from scratch, and multi-task (next page, next service) fine-tuning.

Hyper-parameters are plain numbers and dicts (no nn.Modules), so `save_hyperparameters()` stays clean and
`load_from_checkpoint` works without Hydra.
"""
from __future__ import annotations

import functools

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import BertConfig, BertForMaskedLM, BertModel, get_linear_schedule_with_warmup

from .encoder import mean_pool
from .fused_ce import cross_entropy as fused_cross_entropy
from .packed import QueryRows, packed_hidden


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The MLM loss in eager PyTorch (fp32 logits); `pretrain.fused_ce` swaps in `models.fused_ce.cross_entropy`."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def _adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and LayerNorm weights (BERT's recipe); fused kernels on CUDA."""
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available() and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    # one host sync per step: negligible next to a step of 10^5 tokens, and it stops before the optimizer step
    # (a lagged check would let a NaN update reach the weights and the next checkpoint)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: non-finite loss {loss.item()} at step {step}")


class _Schedule:
    """Linear warm-up then linear decay over the run's optimizer steps, stepped every step."""

    def configure_optimizers(self):  # type: ignore[override]
        opt = _adamw(self, self.hparams.lr, self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(math.ceil(self.hparams.warmup_ratio * total))
        sched = get_linear_schedule_with_warmup(opt, warm, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip here instead of through Lightning's precision plugin: under `bf16-mixed` Lightning refuses to clip
        for a fused optimizer ("performs unscaling of gradients internally"), although bf16 has no grad scaler and
        the gradients are not scaled. With a scaler (fp16) Lightning's own path, which unscales first, is kept."""
        if not gradient_clip_val:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)


class MLMModule(_Schedule, L.LightningModule):
    """BERT masked-language modelling on serialised sessions. The decoder runs on masked positions only."""

    def __init__(self, bert_config: dict, lr: float = 5e-4, weight_decay: float = 0.01, warmup_ratio: float = 0.06,
                 compile: bool = False, fused_qkv: bool = False, compile_layer_norm: bool = False,
                 fused_norm: bool = False, fused_gelu: bool = False, fused_residual: bool = False,
                 fused_ce: bool = False, fused_attention: bool = False):
        super().__init__()
        self.save_hyperparameters()
        cfg = BertConfig(**bert_config)
        if fused_gelu and cfg.hidden_act != "gelu":  # before any compute (packed_hidden checks again, for direct use)
            raise ValueError(f"MLMModule: fused_gelu computes exact GELU, the model's hidden_act is {cfg.hidden_act!r}")
        cfg._attn_implementation = "sdpa"
        self.model = BertForMaskedLM(cfg)
        fwd = functools.partial(packed_hidden, fused_qkv=fused_qkv,  # pretrain.fused_qkv
                                layer_norm_in_graph=compile_layer_norm,  # benchmarks only (slower: notes_speed.md)
                                fused_norm=fused_norm,  # pretrain.fused_norm
                                fused_gelu=fused_gelu,  # pretrain.fused_gelu
                                fused_residual=fused_residual,  # pretrain.fused_residual
                                fused_attention=fused_attention)  # pretrain.fused_attention
        self._packed = torch.compile(fwd) if compile else fwd  # compile: pretrain.compile
        self._ce = fused_cross_entropy if fused_ce else _cross_entropy  # pretrain.fused_ce

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        sel = labels != -100  # (B, T)
        logits = self.model.cls(hidden[sel])  # (M, V): only the masked positions reach the vocabulary projection
        return self._ce(logits, labels[sel])

    def packed_loss(self, batch: dict) -> torch.Tensor:
        """MLM loss of a `PackedMLMCollator` batch: padding-free encoder, decoder on the fixed masked-position
        index (filler rows have label -100 and are ignored), so no step waits on the host. The encoder's last layer
        runs on those rows only (`packed_hidden(rows=...)`): its attention's queries too, except under torch.compile
        (the per-batch query counts would be new shapes to it), where it runs from its attention output on."""
        hidden = self._packed(self.model.bert, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                              batch["max_len"], rows=self.mlm_rows(batch))  # (M, H): last layer on these rows
        logits = self.model.cls(hidden)  # (M, V)
        return self._ce(logits, batch["mlm_labels"], ignore_index=-100)

    def mlm_rows(self, batch: dict) -> torch.Tensor | QueryRows:
        """The decoder's rows as `packed_loss` passes them to `packed_hidden`: with their per-session query ranges
        (`QueryRows`) where the batch has them and the encoder is not compiled, else the positions alone."""
        if "mlm_cu_seqlens" in batch and not self.hparams.compile:
            return QueryRows(batch["mlm_positions"], batch["mlm_cu_seqlens"], batch["mlm_max_len"], batch["mlm_count"])
        return batch["mlm_positions"]

    def _step(self, batch: dict, name: str) -> torch.Tensor:
        if "cu_seqlens" in batch:
            loss, n = self.packed_loss(batch), len(batch["idx"])
        else:
            loss, n = self(batch["input_ids"], batch["attention_mask"], batch["labels"]), len(batch["input_ids"])
        self.log(f"pretrain/{name}_mlm_loss", loss, prog_bar=True, batch_size=n,
                 on_step=name == "train", on_epoch=True, sync_dist=name != "train")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        _check_finite(loss, "pretrain", self.global_step)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")


def _head_metrics(n: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "f1_micro": MulticlassF1Score(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "f1_weighted": MulticlassF1Score(n, average="weighted"),
            "hit@5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
        },
        prefix=prefix,
    )


class MultiTaskModule(_Schedule, L.LightningModule):
    """Next-page and next-service classification heads over a BERT encoder (ours, or a general-text one).

    `logits()` is the one code path shared by validation, test, prediction and the recommender.
    """

    def __init__(self, encoder_config: dict, n_pages: int, n_services: int, lr: float = 1e-4,
                 weight_decay: float = 0.01, warmup_ratio: float = 0.06, page_weight: float = 1.0,
                 service_weight: float = 1.0, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"finetune.pooling must be cls or mean, got {pooling!r}")
        cfg = BertConfig(**encoder_config)
        cfg._attn_implementation = "sdpa"
        self.encoder = BertModel(cfg, add_pooling_layer=False)
        h = cfg.hidden_size
        self.drop = nn.Dropout(dropout)
        self.page_head = nn.Linear(h, n_pages)
        self.service_head = nn.Linear(h, n_services)
        self.metrics = nn.ModuleDict(
            {f"{split}_{head}": _head_metrics(n, f"finetune/{split}_{head}_")
             for split in ("val", "test") for head, n in (("page", n_pages), ("service", n_services))}
        )

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, H) session embedding: mean of the last layer over non-padding tokens."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.heads(hidden, attention_mask)

    def heads(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) last layer -> (page, service) logits (sessionbert.score reuses one encoder pass for the
        heads and the session embedding)."""
        pooled = hidden[:, 0] if self.hparams.pooling == "cls" else mean_pool(hidden, attention_mask)
        pooled = self.drop(pooled)
        return self.page_head(pooled), self.service_head(pooled)  # (B, n_pages), (B, n_services)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        page, service = self.logits(batch["input_ids"], batch["attention_mask"])
        lp = F.cross_entropy(page.float(), batch["page"])
        ls = F.cross_entropy(service.float(), batch["service"])
        loss = self.hparams.page_weight * lp + self.hparams.service_weight * ls
        _check_finite(loss, "finetune", self.global_step)
        bs = len(batch["input_ids"])
        self.log_dict({"finetune/train_page_loss": lp, "finetune/train_service_loss": ls}, batch_size=bs)
        self.log("finetune/train_loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def _eval(self, batch: dict, split: str) -> None:
        page, service = self.logits(batch["input_ids"], batch["attention_mask"])
        bs = len(batch["input_ids"])
        self.log(f"finetune/{split}_loss", F.cross_entropy(page.float(), batch["page"])
                 + F.cross_entropy(service.float(), batch["service"]), batch_size=bs, sync_dist=True)
        for head, logit in (("page", page), ("service", service)):
            m = self.metrics[f"{split}_{head}"]
            m.update(logit.float(), batch[head])
            self.log_dict(m, batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        page, service = self.logits(batch["input_ids"], batch["attention_mask"])
        return {"idx": batch["idx"], "page": page.float().softmax(-1), "service": service.float().softmax(-1)}
