"""Graph breaks of torch.compile over the packed encoder (models.packed.packed_hidden) on a GPU: which calls split
the layer into several compiled regions (the profile of bench_gpu.py --compile showed GELU and attention in their own
regions). Tiny BERT, bf16 autocast, fused QKV, LayerNorm in the graph. Prints torch._dynamo.explain's break reasons."""
import functools

import torch
from transformers import BertConfig, BertModel

from sessionbert.models.packed import packed_hidden

cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                 attention_probs_dropout_prob=0.0)
bert = BertModel(cfg, add_pooling_layer=False).cuda().train()
lens = torch.tensor([100, 28, 128, 64], dtype=torch.int32)
cu = torch.zeros(5, dtype=torch.int32)
cu[1:] = lens.cumsum(0)
n = int(cu[-1])
ids = torch.randint(5, 1000, (n,), device="cuda")
pos = torch.cat([torch.arange(int(k)) for k in lens]).cuda()
print(torch.__version__)
for ln in (True, False):
    f = functools.partial(packed_hidden, fused_qkv=True, layer_norm_in_graph=ln)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ex = torch._dynamo.explain(f)(bert, ids, pos, cu.cuda(), 128)
    print(f"layer_norm_in_graph={ln}: graphs {ex.graph_count}, breaks {ex.graph_break_count}")
    seen = set()
    for b in ex.break_reasons:
        key = b.reason[:200]
        if key in seen:
            continue
        seen.add(key)
        print("  reason:", b.reason[:400].replace("\n", " "))
        for fr in b.user_stack[-2:]:
            print("    at", fr.filename.split("/")[-1], fr.lineno, fr.line)
