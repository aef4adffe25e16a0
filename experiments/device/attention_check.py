"""On a GPU: `models.fused_attention` (pretrain.fused_attention) against torch's varlen FlashAttention, both in bf16,
each compared with fp32 attention (the padded SDPA fallback of `models.packed.varlen_attention` on fp32 copies).
Sessions up to 32 and 64 tokens (backward programs of 32 / 64 keys), up to 128 (one backward kernel) and up to 512
(the dq kernel too), q / k / v as column views of one
(N, 3 * 768) projection plus the Q / K / V biases, as in the packed encoder: for fp32 and varlen the bias adds are in
autograd's graph; for the Triton kernels the biases are added detached and the kernels sum their gradients
(`bias_grads`). Max relative error of the output, of dq, dk, dv, and of the query / value bias gradients
(max |diff| / max |fp32|; the key bias's gradient is ~0 in exact maths, so its max |diff| is reported as is) for each
kernel: the Triton one should sit as close to fp32 as varlen does. Prints one JSON line."""
import json

import torch

from sessionbert.models.packed import varlen_attention

torch.manual_seed(0)
out = {}
for seq, lo in ((32, 1), (64, 1), (128, 1), (512, 1), (512, 200)):
    lens = torch.randint(lo, seq + 1, (400,))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.cuda()
    n, max_len = int(cu[-1]), int(lens.max())
    base = torch.randn(n, 3, 12, 64, device="cuda") * 2
    bias = torch.randn(3, 768, device="cuda")
    g = torch.randn(n, 12, 64, device="cuda")
    res = {}
    for name in ("fp32", "varlen", "triton"):
        dt = torch.float32 if name == "fp32" else torch.bfloat16
        qkv = base.to(dt).detach().clone().requires_grad_()  # a leaf per kernel
        bs = [b.detach().clone().requires_grad_() for b in bias]  # fp32, as the parameters
        fused = name == "triton"
        q, k, v = (t + (b.detach() if fused else b).to(dt).view(12, 64) for t, b in zip(qkv.unbind(1), bs))
        if name == "fp32":  # the padded SDPA fallback, fp32, on the CPU
            o = varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), max_len).cuda()
        else:
            o = varlen_attention(q, k, v, cu, max_len, fused=fused, bias_grads=bs if fused else None)
        o.backward(g.to(dt))
        res[name] = (o.detach().float(), qkv.grad.float(), [b.grad.float() for b in bs])
    o0, g0, b0 = res["fp32"]
    for name in ("varlen", "triton"):
        o1, g1, b1 = res[name]
        rel = {"o": float((o1 - o0).abs().max() / o0.abs().max())}
        for i, part in enumerate("qkv"):
            rel["d" + part] = float((g1[:, i] - g0[:, i]).abs().max() / g0[:, i].abs().max())
        rel["dbq"] = float((b1[0] - b0[0]).abs().max() / b0[0].abs().max())
        rel["dbv"] = float((b1[2] - b0[2]).abs().max() / b0[2].abs().max())
        rel["dbk_max_abs_diff"] = float((b1[1] - b0[1]).abs().max())
        out[f"seq{seq}_min{lo}_{name}"] = rel
    out[f"seq{seq}_min{lo}_tokens"] = n
print(json.dumps(out))
