"""GPU check of the packed path (run on the device before benchmarking it): varlen kernel present, per-session
attention equal to SDPA on each session alone (bf16), packed MLM loss equal to the padded path's."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sessionbert.data.datasets import MLMCollator, PackedMLMCollator  # noqa: E402
from sessionbert.models.encoder import ARCHS, bert_config  # noqa: E402
from sessionbert.models.modules import MLMModule  # noqa: E402
from sessionbert.models.packed import has_varlen_kernel, varlen_attention  # noqa: E402

print("torch", torch.__version__, "varlen kernel:", has_varlen_kernel("cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
lens = [5, 1, 130, 64, 3, 200]
cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), device="cuda")
q, k, v = (torch.randn(sum(lens), 12, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out = varlen_attention(q, k, v, cu, 256)
err = 0.0
for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
    ref = torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[0]
    err = max(err, (out[s:e].float() - ref.transpose(0, 1).float()).abs().max().item())
print("varlen vs per-session SDPA, bf16 max abs err:", err)
torch.manual_seed(0)
cfg = bert_config(30000, 0, ARCHS["base"], dropout=0.0)
cfg.attention_probs_dropout_prob = 0.0
m = MLMModule(cfg.to_dict()).cuda()
rng = np.random.default_rng(0)
items = [{"idx": i, "input_ids": [2] + rng.integers(6, 30000, n - 2).tolist() + [3]}
         for i, n in enumerate(rng.integers(8, 128, 300))]
mlm = MLMCollator(0, 4, 30000, [0, 1, 2, 3, 4, 5], 0.15, seed=1)
pb = mlm(items)
kb = PackedMLMCollator(mlm, 128)(items)
kb = {k_: v_.cuda() if torch.is_tensor(v_) else v_ for k_, v_ in kb.items()}
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    lp = m(pb["input_ids"].cuda(), pb["attention_mask"].cuda(), pb["labels"].cuda()).item()
    lk = m.packed_loss(kb).item()
print(f"BERT-base bf16 MLM loss: padded {lp:.5f} packed {lk:.5f} rel diff {abs(lp - lk) / lp:.2e}")
assert abs(lp - lk) / lp < 1e-2
