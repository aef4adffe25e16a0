"""On a GPU: `models.fused_attention` (pretrain.fused_attention) against torch's varlen FlashAttention, both in bf16,
each compared with fp32 attention (the padded SDPA fallback of `models.packed.varlen_attention` on fp32 copies).
Sessions up to 128 tokens (one backward kernel) and up to 512 (the dq kernel too), q / k / v as column views of one
(N, 3 * 768) projection as in the packed encoder. Max relative error of the output and of dq, dk, dv (max |diff| /
max |fp32|) for each kernel; the Triton one should sit as close to fp32 as varlen does. Prints one JSON line."""
import json

import torch

from sessionbert.models.fused_attention import attention
from sessionbert.models.packed import varlen_attention

torch.manual_seed(0)
out = {}
for seq, lo in ((128, 1), (512, 1), (512, 200)):
    lens = torch.randint(lo, seq + 1, (400,))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.cuda()
    n, max_len = int(cu[-1]), int(lens.max())
    base = torch.randn(n, 3, 12, 64, device="cuda") * 2
    g = torch.randn(n, 12, 64, device="cuda")
    res = {}
    for name in ("fp32", "varlen", "triton"):
        dt = torch.float32 if name == "fp32" else torch.bfloat16
        qkv = base.to(dt).detach().clone().requires_grad_()  # a leaf per kernel
        q, k, v = qkv.unbind(1)
        if name == "fp32":
            o = varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), max_len).cuda()  # padded SDPA fallback, fp32
        elif name == "varlen":
            o = varlen_attention(q, k, v, cu, max_len)
        else:
            o = attention(q, k, v, cu, max_len)
        o.backward(g.to(dt))
        res[name] = (o.detach().float(), qkv.grad.float())
    o0, g0 = res["fp32"]
    for name in ("varlen", "triton"):
        o1, g1 = res[name]
        rel = {"o": float((o1 - o0).abs().max() / o0.abs().max())}
        for i, part in enumerate("qkv"):
            rel["d" + part] = float((g1[:, i] - g0[:, i]).abs().max() / g0[:, i].abs().max())
        out[f"seq{seq}_min{lo}_{name}"] = rel
    out[f"seq{seq}_min{lo}_tokens"] = n
print(json.dumps(out))
