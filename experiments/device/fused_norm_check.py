"""On a GPU: `pretrain.fused_norm` (Triton dropout + add + LayerNorm) against the eager path in the packed encoder.
BERT-base shape, bf16 autocast, dropout 0 (the two paths draw dropout from different generators): max relative
difference of the loss, of the last hidden layer, and of every parameter gradient; then the dropout path's drop
share. Prints one JSON line."""
import json

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from sessionbert.models.fused_norm import dropout_add_layer_norm
from sessionbert.models.packed import packed_hidden

torch.manual_seed(0)
cfg = BertConfig(vocab_size=30000, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
model = BertForMaskedLM(cfg).cuda().train()
lens = torch.randint(8, 129, (600,))
cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
cu[1:] = lens.cumsum(0)
n = int(cu[-1])
ids = torch.randint(6, 30000, (n,), device="cuda")
pos = torch.cat([torch.arange(int(k)) for k in lens]).cuda()
sel = torch.randperm(n, device="cuda")[: n // 7]
out = {"tokens": n}
res = {}
for fused in (False, True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = packed_hidden(model.bert, ids, pos, cu.cuda(), 128, fused_qkv=True, fused_norm=fused)
        loss = F.cross_entropy(model.cls(h[sel]).float(), ids[sel])
    loss.backward()
    res[fused] = (loss.detach(), h.detach().float(), {k: p.grad.detach().float().clone()
                                                      for k, p in model.named_parameters() if p.grad is not None})
(l0, h0, g0), (l1, h1, g1) = res[False], res[True]
out["loss_eager"], out["loss_fused"] = float(l0), float(l1)
out["hidden_max_rel"] = float((h1 - h0).abs().max() / h0.abs().max())
rel = {k: float((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)) for k in g0}
# the attention key bias gets a gradient of ~0 in exact maths (softmax ignores a shift per query): skip its ratio
rel = {k: v for k, v in rel.items() if not k.endswith("key.bias")}
out["grad_rel_norm_max"] = max(rel.values())
out["grad_rel_norm_median"] = sorted(rel.values())[len(rel) // 2]
out["grad_rel_norm_worst"] = max(rel, key=rel.get)
out["grads_missing"] = sorted(set(g0) - set(g1))
ln = torch.nn.LayerNorm(768).cuda()
a = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
x = torch.randn(n, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
y = dropout_add_layer_norm(a, x, ln, 0.1)
y.backward(torch.randn_like(y))
out["dropout_share_da"] = float((a.grad == 0).float().mean())
print(json.dumps(out))
