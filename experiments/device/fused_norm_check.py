"""On a GPU: the packed encoder's Triton kernels (`pretrain.fused_norm`: dropout + add + LayerNorm with the dense
bias; `pretrain.fused_gelu`: bias + GELU), the residual gradient summed in the branch GEMMs
(`pretrain.fused_residual`), the Triton MLM cross-entropy (`pretrain.fused_ce`) and the Triton attention
(`pretrain.fused_attention`) against the eager path. BERT-base shape, dropout 0 (the two paths draw
dropout from different generators). Every variant runs the same batch; each bf16-autocast variant (eager, fused norm,
fused norm + fused GELU) is compared with the fp32 eager run: loss, last hidden layer (max relative difference) and
every parameter gradient (relative norm of the difference), so a fused variant should sit as close to fp32 as eager
bf16 does; `all_fused_rows` runs the last layer past its attention on the decoder's rows only, as
`MLMModule.packed_loss` did until session 16 (`packed_hidden(rows=...)`), `all_fused_qrows` its attention's queries on
those rows only too, as it does now (`rows=QueryRows(...)`). The hidden rows compared are the decoder's. Then the dropout
path's drop share, and the cross-entropy kernels alone on bf16 logits of the MLM's shape (with ignored rows) against `F.cross_entropy(logits.float())`. Prints one JSON line."""
import json

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from sessionbert.models.fused_ce import cross_entropy
from sessionbert.models.fused_norm import dropout_add_layer_norm
from sessionbert.models.packed import QueryRows, packed_hidden

torch.manual_seed(0)
cfg = BertConfig(vocab_size=30000, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
model = BertForMaskedLM(cfg).cuda().train()
lens = torch.randint(8, 129, (600,))
cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
cu[1:] = lens.cumsum(0)
n = int(cu[-1])
ids = torch.randint(6, 30000, (n,), device="cuda")
pos = torch.cat([torch.arange(int(k)) for k in lens]).cuda()
sel = torch.randperm(n, device="cuda")[: n // 7].sort().values  # sorted, as the collator's masked positions
cu_q = torch.searchsorted(sel, cu.cuda().long()).to(torch.int32)
qrows = QueryRows(sel, cu_q, int((cu_q[1:] - cu_q[:-1]).max()), len(sel))
out = {"tokens": n}
res = {}
# name -> (autocast, packed_hidden / fused_ce switches)
every = dict(fused_norm=True, fused_gelu=True, fused_residual=True, fused_ce=True)
variants = {"fp32": (False, {}), "eager_bf16": (True, {}), "fused_norm": (True, dict(fused_norm=True)),
            "fused_norm_gelu": (True, dict(fused_norm=True, fused_gelu=True)),
            "fused_residual": (True, dict(fused_residual=True)), "fused_ce": (True, dict(fused_ce=True)),
            "fused_attention": (True, dict(fused_attention=True)), "all_fused_but_attention": (True, every),
            "all_fused": (True, dict(every, fused_attention=True)),
            "all_fused_rows": (True, dict(every, fused_attention=True, rows=True)),
            "all_fused_qrows": (True, dict(every, fused_attention=True, rows="q"))}
for name, (amp, knobs) in variants.items():
    knobs = dict(knobs)
    fused_ce = knobs.pop("fused_ce", False)
    rows = knobs.pop("rows", False)  # the last layer past its attention (its queries too: "q") on the decoder's rows
    rows = qrows if rows == "q" else sel if rows else None
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        h = packed_hidden(model.bert, ids, pos, cu.cuda(), 128, fused_qkv=True, rows=rows, **knobs)
        h = h if rows is not None else h[sel]  # (M, H): the rows the decoder reads
        logits = model.cls(h)
        loss = cross_entropy(logits, ids[sel]) if fused_ce else F.cross_entropy(logits.float(), ids[sel])
    loss.backward()
    res[name] = (loss.detach(), h.detach().float(), {k: p.grad.detach().float().clone()
                                                     for k, p in model.named_parameters() if p.grad is not None})
l0, h0, g0 = res["fp32"]
out["loss_fp32"] = float(l0)
for name in list(variants)[1:]:
    l1, h1, g1 = res[name]
    rel = {k: float((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)) for k in g0}
    # the attention key bias gets a gradient of ~0 in exact maths (softmax ignores a shift per query): skip its ratio
    rel = {k: v for k, v in rel.items() if not k.endswith("key.bias")}
    out[name] = dict(loss=float(l1), hidden_max_rel=float((h1 - h0).abs().max() / h0.abs().max()),
                     grad_rel_norm_max=max(rel.values()), grad_rel_norm_median=sorted(rel.values())[len(rel) // 2],
                     grad_rel_norm_worst=max(rel, key=rel.get), grads_missing=sorted(set(g0) - set(g1)))
ln = torch.nn.LayerNorm(768).cuda()
a = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
x = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
y = dropout_add_layer_norm(a, x, ln, 0.1)
y.backward(torch.randn_like(y))
out["dropout_share_da"] = float((a.grad == 0).float().mean())
# the cross-entropy kernels alone: bf16 logits of the MLM's shape, every 10th row ignored, against eager on .float()
m = 19000
logits = (torch.randn(m, 30000, device="cuda") * 4).to(torch.bfloat16).requires_grad_()
labels = torch.randint(0, 30000, (m,), device="cuda")
labels[::10] = -100
ref = logits.detach().clone().requires_grad_()
lf = cross_entropy(logits, labels)
lf.backward()
le = F.cross_entropy(ref.float(), labels, ignore_index=-100)
le.backward()
out["ce_kernels"] = dict(loss_fused=float(lf), loss_eager=float(le), grad_max_abs_diff=float((logits.grad.float() - ref.grad.float()).abs().max()),
                         grad_max_abs=float(ref.grad.float().abs().max()),
                         ignored_rows_grad_zero=bool((logits.grad[::10] == 0).all()))
print(json.dumps(out))
