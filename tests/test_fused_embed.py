"""The packed encoder's embeddings as one Triton kernel each way (sessionbert/models/fused_embed.py, on with
`pretrain.fused_norm`): against HF `BertEmbeddings` on the CPU (its fallback) and, through Triton's interpreter in a
subprocess (chosen when the kernels are defined), the kernels themselves. The packed encoder with every switch (the
embeddings included) against the plain path: tests/test_fused_norm.py's interpreter checks."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

from sessionbert.models.fused_embed import embed

from .test_fused_norm import interpreted


def _emb(h=24, vocab=50, positions=16, dropout=0.0, seed=0) -> BertEmbeddings:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=h, max_position_embeddings=positions, type_vocab_size=2,
                     hidden_dropout_prob=dropout, pad_token_id=0)
    emb = BertEmbeddings(cfg)
    torch.nn.init.normal_(emb.LayerNorm.weight)
    torch.nn.init.normal_(emb.LayerNorm.bias)
    return emb


def test_without_triton_kernels_embed_is_bert_embeddings():
    """On a CPU without the interpreter `embed` is the module itself (token type 0), in the asked dtype."""
    emb = _emb()
    ids, pos = torch.tensor([3, 0, 7, 49, 1]), torch.tensor([0, 1, 2, 0, 1])
    ref = emb(input_ids=ids[None], position_ids=pos[None], token_type_ids=torch.zeros_like(ids)[None])[0]
    torch.testing.assert_close(embed(emb, ids, pos), ref)
    torch.testing.assert_close(embed(emb, ids, pos, fused=False), ref)
    assert embed(emb, ids, pos, torch.bfloat16).dtype == torch.bfloat16


def test_embed_refuses_streams_of_other_shapes():
    emb = _emb()
    with pytest.raises(ValueError, match=r"input_ids \(1, 3\) and position_ids \(1, 3\) must be the same \(N,\)"):
        embed(emb, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids \(2,\)"):
        embed(emb, torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long))


_CHECKS = r"""
import itertools, json, sys
import torch
sys.path.insert(0, ".")
from sessionbert.models import fused_embed as fe
from sessionbert.models.fused_norm import available, _block
from tests.test_fused_embed import _emb

assert available("cpu"), "the interpreter should make the kernels available on a CPU"
out = {}


def grads(emb):
    return {k: p.grad.clone() for k, p in emb.named_parameters() if p.grad is not None}


# without dropout: the output and every parameter's gradient against BertEmbeddings, 70 rows (several backward
# programs, the last short), 48 / 20 columns (masked block), the padding id (no gradient for its row) and repeats
g = torch.Generator().manual_seed(0)
for n, h in ((70, 48), (5, 20)):
    emb, ref = _emb(h=h, seed=1), _emb(h=h, seed=1)
    ids = torch.randint(0, 50, (n,), generator=g)
    ids[:3] = torch.tensor([0, 7, 7])
    pos = torch.randint(0, 16, (n,), generator=g)
    dy = torch.randn(n, h, generator=g)
    y = fe.embed(emb, ids, pos)
    y.backward(dy)
    y2 = ref(input_ids=ids[None], position_ids=pos[None], token_type_ids=torch.zeros_like(ids)[None])[0]
    y2.backward(dy)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)
    gf, gr = grads(emb), grads(ref)
    assert sorted(gf) == sorted(gr), (sorted(gf), sorted(gr))
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-4, atol=1e-5, msg=f"{k} at {n}x{h}")
    out[f"p0_{n}x{h}"] = [float(gf["word_embeddings.weight"][0].abs().sum()),
                          float(gf["token_type_embeddings.weight"][1].abs().sum())]

# bf16 output (the packed encoder under autocast): fp32 tables and gradients
emb = _emb(h=32)
ids, pos = torch.randint(1, 50, (40,), generator=g), torch.randint(0, 16, (40,), generator=g)
yb = fe.embed(emb, ids, pos, torch.bfloat16)
yb.float().sum().backward()
ref = _emb(h=32)(input_ids=ids[None], position_ids=pos[None], token_type_ids=torch.zeros_like(ids)[None])[0]
out["bf16"] = [str(yb.dtype), str(emb.word_embeddings.weight.grad.dtype),
               float((yb.float() - ref.detach()).abs().max())]

# dropout: the positions dropped are the forward's in backward too (gradient through them zero), rate about p,
# kept ones scaled by 1 / (1 - p); the same seed gives the same draws
p, n, h = 0.3, 96, 40
emb, ref = _emb(h=h, dropout=p, seed=2), _emb(h=h, dropout=0.0, seed=2)
ids, pos = torch.randint(1, 50, (n,), generator=g), torch.randint(0, 16, (n,), generator=g)
torch.manual_seed(11)
y = fe.embed(emb, ids, pos)
keep = (y != 0).float()
y0 = ref(input_ids=ids[None], position_ids=pos[None], token_type_ids=torch.zeros_like(ids)[None])[0]
torch.testing.assert_close(y, y0 * keep / (1 - p), rtol=1e-4, atol=1e-5)
dy = torch.randn(n, h, generator=g)
y.backward(dy)
y0.backward(dy * keep / (1 - p))
gf, gr = grads(emb), grads(ref)
for k in gr:
    torch.testing.assert_close(gf[k], gr[k], rtol=1e-4, atol=1e-4, msg=f"{k} with dropout")
out["drop_share"] = 1 - float(keep.mean())
torch.manual_seed(11)
out["same_seed_equal"] = bool(torch.equal(fe.embed(emb, ids, pos), y))
emb.eval()
torch.testing.assert_close(fe.embed(emb, ids, pos), y0)  # eval: no dropout

# every tile shape the autotuners may pick (the interpreter tries only the first), launched directly, dropout on,
# against the autograd path's results
n, h, p, seed = 70, 48, 0.2, 77
emb = _emb(h=h, seed=3)
ids, pos = torch.randint(0, 50, (n,), generator=g), torch.randint(0, 16, (n,), generator=g)
tabs = [emb.word_embeddings.weight.detach(), emb.position_embeddings.weight.detach(),
        emb.token_type_embeddings.weight.detach()]
w, b = emb.LayerNorm.weight.detach(), emb.LayerNorm.bias.detach()
dy = torch.randn(n, h, generator=g)
first = None
tiles = []
for rb in (1, 2, 4):
    y, mean, rstd = torch.empty(n, h), torch.empty(n), torch.empty(n)
    fe._fwd_kernel.fn[(-(-n // rb),)](ids, pos, *tabs, w, b, y, mean, rstd, n, h, 1e-12, p, seed, BLOCK=_block(h),
                                      RB=rb, DROPOUT=True)
    first = first or (y, mean, rstd)
    assert all(torch.allclose(u, v, rtol=1e-6, atol=1e-6) for u, v in zip((y, mean, rstd), first)), f"fwd RB={rb}"
    tiles.append(["fwd", rb])
bwd_first = None
for rb, rows in itertools.product((1, 2), (16, 32)):
    progs = -(-n // rows)
    de, parts = torch.empty(n, h), torch.empty(3, progs, h)
    fe._bwd_kernel.fn[(progs,)](dy, ids, pos, *tabs, w, first[1], first[2], de, parts[0], parts[1], parts[2], n, h,
                                p, seed, BLOCK=_block(h), RB=rb, ROWS=rows, DROPOUT=True)
    res = (de, *parts.sum(1))
    bwd_first = bwd_first or res
    assert all(torch.allclose(u, v, rtol=1e-5, atol=1e-5) for u, v in zip(res, bwd_first)), f"bwd {rb} {rows}"
    tiles.append(["bwd", rb, rows])
out["tiles"] = tiles
torch.testing.assert_close(bwd_first[3], bwd_first[0].sum(0), rtol=1e-5, atol=1e-5)  # token-type row: column sums
# the tables' scatter: each id's rows summed, the padding row zero, also under deterministic mode
add = torch.zeros(tabs[0].shape).index_add_(0, ids, bwd_first[0])
add[ids[0]] = 0
torch.use_deterministic_algorithms(True)
torch.testing.assert_close(fe._scatter(tabs[0], ids, bwd_first[0], int(ids[0])), add)
torch.use_deterministic_algorithms(False)
torch.testing.assert_close(fe._scatter(tabs[1], pos, bwd_first[0]),
                           torch.zeros(tabs[1].shape).index_add_(0, pos, bwd_first[0]))

# out-of-range ids fail (on a GPU: a device-side assert, as F.embedding's)
for name, bad in (("input_ids", (torch.tensor([1, 50]), torch.tensor([0, 1]))),
                  ("position_ids", (torch.tensor([1, 2]), torch.tensor([0, 16])))):
    try:
        fe.embed(_emb(), *bad)
        out[f"bad_{name}"] = "accepted"
    except RuntimeError as e:
        out[f"bad_{name}"] = str(e)

# a forward pass in eval mode (no_grad) through the kernels that serve a forward (hidden dropout 0.1 configured: eval
# turns it off in the kernels too) against the plain packed pass, both fp32
from sessionbert.models.packed import packed_hidden
from sessionbert.score import pack_rows
FUSED_FORWARD = dict(fused_qkv=True, fused_norm=True, fused_gelu=True, fused_attention=True)
from tests.test_packed import _module
bert = _module(hidden_dropout=0.1).model.bert.eval()
lens = [9, 30, 4, 17, 25]
flat, pos, cu = pack_rows(torch.randint(5, 60, (sum(lens),), generator=g).numpy(),
                          torch.tensor([0, *lens]).cumsum(0).numpy(), torch.arange(len(lens)).numpy())
args = (torch.from_numpy(flat), torch.from_numpy(pos), torch.from_numpy(cu), max(lens))
with torch.no_grad():
    out["inference_max_diff"] = float((packed_hidden(bert, *args, **FUSED_FORWARD) - packed_hidden(bert, *args))
                                      .abs().max())

ye = fe.embed(emb, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
ye.sum().backward()
out["empty"] = list(ye.shape)
print("RESULT " + json.dumps(out))
"""


def test_fused_embeddings_under_the_interpreter():
    """The kernels through Triton's interpreter against BertEmbeddings: output and every parameter's gradient (word
    table with its padding row and repeated ids, positions, token-type row, LayerNorm), bf16 output, dropout (the
    same positions dropped in backward, the same seed the same draws), every tile shape of the autotuned configs,
    the deterministic scatter, out-of-range ids, no rows; and the packed encoder in eval mode with every kernel
    that serves a forward pass against the plain packed pass."""
    out = interpreted(_CHECKS)
    # the padding row (id 0, in the batch) and the unused token type get no gradient
    assert out["p0_70x48"] == out["p0_5x20"] == [0.0, 0.0]
    assert out["bf16"][:2] == ["torch.bfloat16", "torch.float32"] and out["bf16"][2] < 0.05
    assert 0.24 < out["drop_share"] < 0.36  # 3840 draws at p = 0.3: ~0.3 +- 0.0074
    assert out["same_seed_equal"]
    assert out["tiles"] == [["fwd", rb] for rb in (1, 2, 4)] + [["bwd", rb, rows] for rb in (1, 2) for rows in (16, 32)]
    assert "input_ids out of range for a table of 50 rows" in out["bad_input_ids"]
    assert "position_ids out of range for a table of 16 rows" in out["bad_position_ids"]
    assert out["empty"] == [0, 48]
    assert out["inference_max_diff"] < 1e-4
