#!/usr/bin/env python3
"""MLM pretraining throughput of SessionBERT's training path against the Hugging Face reference (issue 6).

For each seq_len (128, 512), BERT shape `--model`, vocabulary `--vocab`:
  reference  /work/shared/bench/hf_peer_mlm.py as a subprocess (its defaults: BertForMaskedLM, one session per
             example padded to the longest of a 131072-slot batch, decoder + loss on every slot, bf16 autocast,
             SDPA, fused AdamW); its JSON line is parsed.
  ours       MLMModule forward (decoder on masked positions only) + backward + our fused AdamW (`_adamw`) step in
             bf16 autocast, on batches made by MLMCollator (15% masking, 80/10/10) from TokenBudgetBatchSampler
             (length bucketing, same 131072-slot budget per step), same session-length distribution capped at
             seq_len; optionally the encoder under torch.compile(dynamic=True) (`--compile`).
Token ids are random in-vocabulary ids (like the reference): only the lengths matter for speed.
Batches are collated on the CPU before timing (as the reference builds its batches up front); the CPU cost
of collation is measured separately (`collate_ms_per_batch`, one process).

Reported: real (non-pad) tokens/s, slot tokens/s, padding share, MFU, peak GPU memory, ratio ours/reference,
as JSON (`--out`) and a markdown table (printed, and `--md`). MFU counts *model* FLOPs: 6 x (dense encoder
params + attention over the session's own length) per real token, plus 6 x decoder params per masked position
(the reference's own `mfu` counts every padded slot and the decoder on all of them: kept as `hf_reported_mfu`).
The packed path runs its last layer past the attention on the masked rows only; `mfu` still counts that layer on
every real token (the model's FLOPs, the same count as the reference's), `mfu_executed` only the work it runs.

  # lengths from the simulator (CPU, ~15 s), then the benchmark on a GPU:
  python experiments/bench_gpu.py --write-lengths .bench/lengths_sim.npy
  python experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py
  # CPU smoke test:
  python experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --model tiny --steps 2 --warmup 1 \
      --tokens-per-step 8192
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sessionbert.data.datasets import MLMCollator, PackedMLMCollator  # noqa: E402
from sessionbert.data.sampler import TokenBudgetBatchSampler  # noqa: E402
from sessionbert.models.encoder import ARCHS, bert_config  # noqa: E402
from sessionbert.models.modules import MLMModule, _adamw  # noqa: E402
from sessionbert.models.packed import QueryRows  # noqa: E402

SPECIAL = dict(pad=0, unk=1, cls=2, sep=3, mask=4, evt=5)  # order of serialize.SPECIAL_TOKENS
DEFAULT_PEER = "/work/shared/bench/hf_peer_mlm.py"


# ------------------------------------------------------------------------------------------- lengths file
def write_lengths(path: str, size: str = "default", seed: int = 0, seq_len: int = 512, vocab: int = 30000) -> dict:
    """Token counts of every simulated session, serialised and tokenised by the pipeline's own pieces
    (truncation at `seq_len`=512, i.e. uncapped up to 512)."""
    from sessionbert.data.corpus import Corpus
    from sessionbert.data.serialize import SessionEncoder
    from sessionbert.data.simulator import sim_config, simulate
    from sessionbert.data.tokenizer import train_wordpiece

    sim = simulate(sim_config(size, seed=seed))
    corpus = Corpus.build(sim.events.to_pandas(), sim.billing.to_pandas(), 14, 28)
    tok, note = train_wordpiece(corpus.train_texts(), vocab)
    enc_obj = SessionEncoder(tok, seq_len)
    enc = corpus.encode(enc_obj)
    lens = np.array([len(enc_obj.build(enc, i)) for i in range(len(corpus.sessions))], dtype=np.int64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, lens)
    info = dict(path=path, simulator_size=size, seed=seed, seq_len=seq_len, sessions=int(len(lens)),
                mean=round(float(lens.mean()), 2), median=float(np.median(lens)),
                p90=float(np.percentile(lens, 90)), share_over_128=round(float((lens > 128).mean()), 4),
                share_at_512=round(float((lens >= 512).mean()), 4), tokenizer=note)
    print(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------------------- FLOPs
def dense_params(cfg) -> tuple[int, int]:
    """(encoder matmul params per token, decoder matmul params per masked position)."""
    L, H, V, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    return L * (4 * H * H + 2 * H * I), H * H + H * V


def model_flops(cfg, seq_lens: np.ndarray, n_masked: int) -> float:
    """Training FLOPs of the useful work: 6 x (encoder params + attention over the session itself) per real
    token, 6 x decoder params per masked position (2 forward + 4 backward FLOPs per weight use)."""
    enc, dec = dense_params(cfg)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    n = seq_lens.astype(np.float64)
    return 6.0 * (enc * n.sum() + L * 2 * H * (n * n).sum() + dec * n_masked)


def skipped_flops(cfg, n_real: int, n_rows: int, lens: np.ndarray | None = None,
                  qlens: np.ndarray | None = None) -> float:
    """Model FLOPs the packed path does not execute: its last layer past the attention (attention-output dense,
    intermediate and output layers: H x H + 2 x H x I weights) runs on the `n_rows` masked-position rows only
    (`packed_hidden(rows=...)`), not on all `n_real` tokens; with `qlens` (each session's masked positions, the last
    attention's queries: `QueryRows`) that attention's scores and outputs too, on those queries only against the
    session's `lens` keys. `mfu` keeps the issue's count (the whole encoder on every real token: model FLOPs, as for
    the reference); `mfu_executed` subtracts this."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    attn = 0.0
    if qlens is not None:
        n = np.asarray(lens, dtype=np.float64)
        attn = 2 * H * float((n * (n - np.asarray(qlens, dtype=np.float64))).sum())
    return 6.0 * ((H * H + 2 * H * I) * max(n_real - n_rows, 0) + attn)


def peer_model_flops_per_real_token(cfg, lengths: np.ndarray, seq: int, mask_share: float = 0.15) -> float:
    """Same model-FLOPs definition for the reference, in expectation over its (capped) length distribution."""
    enc, dec = dense_params(cfg)
    n = np.minimum(lengths, seq).astype(np.float64)
    return 6.0 * (enc + cfg.num_hidden_layers * 2 * cfg.hidden_size * (n * n).sum() / n.sum() + mask_share * dec)


# ------------------------------------------------------------------------------------------------ reference
def run_peer(peer: str, lengths_path: str, seq: int, a) -> dict:
    cmd = [sys.executable, peer, "--lengths", lengths_path, "--seq-len", str(seq), "--model", a.model,
           "--vocab", str(a.vocab), "--tokens-per-step", str(a.tokens_per_step)]
    if a.peer_steps:
        cmd += ["--steps", str(a.peer_steps), "--warmup", str(a.peer_warmup)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"reference failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    out = json.loads(lines[-1])
    out["command"] = " ".join(cmd[1:])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------------ ours
def make_batches(lengths: np.ndarray, seq: int, a, n: int, device: str, packed: bool = False) -> tuple[list, float]:
    """n batches from one shuffled epoch of TokenBudgetBatchSampler over the capped lengths, collated by
    MLMCollator (or, `packed`, PackedMLMCollator: the same masks, sessions end to end) on the CPU. Token ids:
    [CLS] random-in-vocabulary [SEP], like a serialised session."""
    lens = np.minimum(lengths, seq)
    m = 1 if packed else (a.pad_multiple or 1)
    sampler = TokenBudgetBatchSampler(-(-lens // m) * m, a.tokens_per_step, shuffle=True, seed=0)
    coll = MLMCollator(SPECIAL["pad"], SPECIAL["mask"], a.vocab, list(SPECIAL.values()), 0.15,
                       pad_to_multiple_of=None if packed else a.pad_multiple)
    if packed:
        coll = PackedMLMCollator(coll, max_len=seq, multiple=a.pack_multiple)
    g = np.random.default_rng(0)
    out, t_coll, epoch = [], 0.0, 0
    while len(out) < n:
        sampler.set_epoch(epoch)
        for idx in sampler:
            items = [{"idx": i, "input_ids": [SPECIAL["cls"]] + g.integers(6, a.vocab, int(lens[i]) - 2).tolist()
                      + [SPECIAL["sep"]]} for i in idx]
            t0 = time.perf_counter()
            b = coll(items)
            t_coll += time.perf_counter() - t0
            sl = lens[idx]
            if packed:
                out.append(dict({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()},
                                real=int(sl.sum()), slots=int(b["padded_slots"]),
                                masked=int((b["mlm_labels"] != -100).sum()), lens=sl,
                                rows=len(b["mlm_positions"]), qlens=np.diff(b["mlm_cu_seqlens"].numpy())[: len(sl)]))
            else:
                out.append(dict(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                labels=b["labels"].to(device), real=int(sl.sum()), slots=int(b["input_ids"].numel()),
                                masked=int((b["labels"] != -100).sum()), lens=sl))
            if len(out) == n:
                break
        epoch += 1
    return out, 1000 * t_coll / n


# A variant of ours is a dict of these switches (all False when absent), in the order its label and its key suffix
# name them: (switch, label part, key part). The packed-path ones after "ln_graph" each have a --flag also|only.
PARTS = (("packed", " packed", "_packed"), ("fused_qkv", " + fused QKV", "_fusedqkv"), ("compile", " + compile", "_compile"),
         ("ln_graph", " (LayerNorm in graph)", "_lngraph"), ("fused_norm", " + fused norm", "_fusednorm"),
         ("fused_gelu", " + fused GELU", "_fusedgelu"), ("fused_residual", " + fused residual", "_fusedres"),
         ("fused_ce", " + fused CE", "_fusedce"), ("fused_attention", " + fused attention", "_fusedattn"))
# the packed-path switches with a --flag also|only (--fused-qkv, ...): what each measures, for the flag's help
SWITCH_HELP = {"fused_qkv": "one Q/K/V GEMM", "fused_norm": "the Triton dropout + add + LayerNorm kernels",
               "fused_gelu": "the Triton bias + GELU kernels",
               "fused_residual": "the residual's gradient summed in the branch GEMMs",
               "fused_ce": "the Triton MLM cross-entropy",
               "fused_attention": "the Triton attention kernels for short sessions"}
# the MLMModule / pretrain.* knob each packed-path switch sets
KNOBS = {"fused_qkv": "fused_qkv", "ln_graph": "compile_layer_norm", "fused_norm": "fused_norm",
         "fused_gelu": "fused_gelu", "fused_residual": "fused_residual", "fused_ce": "fused_ce",
         "fused_attention": "fused_attention"}


def variant_tag(v: dict) -> str:
    """The suffix naming one of our variants in bench_gpu.json's keys and in profile file names."""
    return "".join(tag for k, _, tag in PARTS if v.get(k))


def variant_label(v: dict) -> str:
    return "ours" + "".join(lab for k, lab, _ in PARTS if v.get(k))


def run_ours(lengths: np.ndarray, seq: int, a, device: str, v: dict) -> dict:
    """One variant `v` of ours (see PARTS); the packed-path switches only apply with v["packed"]."""
    compile_, packed = bool(v.get("compile")), bool(v.get("packed"))
    torch.manual_seed(0)
    if compile_:  # a fresh dynamo cache: earlier runs' graphs and resume frames must not serve this one
        torch._dynamo.reset()
    cfg = bert_config(a.vocab, SPECIAL["pad"], ARCHS[a.model], max_position_embeddings=max(512, seq),
                      dropout=a.dropout)
    if packed:  # the varlen kernel has no attention-probability dropout (hidden dropout 0.1 is kept)
        cfg.attention_probs_dropout_prob = 0.0
    module = MLMModule(cfg.to_dict(), compile=compile_ and packed,
                       **{knob: bool(v.get(k)) and packed for k, knob in KNOBS.items()}).to(device)
    module.train()
    if compile_ and not packed:
        module.model.bert.compile(dynamic=True)
    opt = _adamw(module, 1e-4, 0.01)  # our training path's optimizer (fused on CUDA)
    n_distinct = a.cycle if a.cycle else a.warmup + a.steps
    batches, coll_ms = make_batches(lengths, seq, a, n_distinct, device, packed)
    batches = [batches[i % n_distinct] for i in range(a.warmup + a.steps)]  # --cycle N: N shapes, like the reference
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step(b, module=module, opt=opt):  # bound here: the names are deleted below to free the GPU
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = module.packed_loss(b) if packed else module(b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.sync_check:  # MLMModule.training_step checks the loss every step: one host sync, kept here
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")

    t_w = time.perf_counter()
    for b in batches[: a.warmup]:
        step(b)
    if device == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t_w
    timed = batches[a.warmup:]
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    if device == "cuda":
        torch.cuda.synchronize()
    dts = time.perf_counter() - t0
    real = sum(b["real"] for b in timed)
    slots = sum(b["slots"] for b in timed)
    masked = sum(b["masked"] for b in timed)
    flops = sum(model_flops(module.model.config, b["lens"], b["masked"]) for b in timed)
    skipped = sum(skipped_flops(module.model.config, b["real"], b["rows"], b["lens"],  # the rows packed_loss passed
                                b["qlens"] if isinstance(module.mlm_rows(b), QueryRows) else None)
                  for b in timed) if packed else 0.0
    res = dict(path="sessionbert_mlm_packed" if packed else "sessionbert_mlm", model=a.model, seq_len=seq,
               compile=compile_, compile_layer_norm=bool(v.get("ln_graph")),
               **{k: bool(v.get(k)) and packed for k in KNOBS if k != "ln_graph"},
               packed=packed, pack_multiple=a.pack_multiple if packed else None,
               steps=len(timed),
               real_tokens_per_s=round(real / dts), slot_tokens_per_s=round(slots / dts),
               padding_share=round(1 - real / slots, 4), masked_share=round(masked / real, 4),
               distinct_batches=n_distinct, mean_batch_sessions=round(float(np.mean([len(b["lens"]) for b in timed])), 1),
               mean_batch_width=round(float(np.mean([b["input_ids"].shape[-1] for b in timed])), 1),
               step_ms=round(1000 * dts / len(timed), 2), warmup_s=round(warm_s, 1),
               model_tflops_per_s=round(flops / dts / 1e12, 1),
               mfu=round(flops / dts / (a.peak_tflops * 1e12), 4),
               mfu_executed=round((flops - skipped) / dts / (a.peak_tflops * 1e12), 4),
               collate_ms_per_batch=round(coll_ms, 1))
    if device == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if a.profile_dir:  # a few steps under torch.profiler: where the step's GPU time goes
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            for b in timed[:3]:
                step(b)
            if device == "cuda":
                torch.cuda.synchronize()
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        Path(a.profile_dir).mkdir(parents=True, exist_ok=True)
        name = f"profile_{a.model}_seq{seq}{variant_tag(v)}_{int(lengths.mean())}.txt"
        (Path(a.profile_dir) / name).write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    del step, module, opt, batches
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------------- main
def table(res: dict) -> str:
    # "MFU (FLOPs run)": `mfu_executed`, the packed path's count without the last-layer work it skips
    rows = ["| path | lengths | seq_len | real tokens/s | slot tokens/s | padding | MFU (model FLOPs) | MFU (FLOPs run) "
            "| peak mem GiB | step ms | ours/HF (real tok/s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ratio, run = r.get("ratio_vs_hf"), r.get("mfu_executed")
        rows.append("| {p} | {d} | {s} | {rt:,} | {st:,} | {pad:.1%} | {mfu:.1%} | {run} | {mem} | {ms} | {ratio} |".format(
            p=r["label"], d=r["lengths"], s=r["seq_len"], rt=r["real_tokens_per_s"], st=r["slot_tokens_per_s"],
            pad=r["padding_share"], mfu=r["mfu"], run="-" if run is None else f"{run:.1%}",
            mem=r.get("peak_mem_gib", "-"), ms=r.get("step_ms", "-"), ratio=f"{ratio:.2f}x" if ratio else "-"))
    return "\n".join(rows)


def headline(res: dict) -> None:
    """Goal keys of issue 6 (`real_tokens_per_s_seq128`, `ratio_vs_hf_seq128`, `mfu_seq128`, ...): per seq_len, the
    fastest of our variants on the simulator's lengths, named in `headline_path_seq{S}`."""
    ours = [r for r in res["runs"] if r.get("path", "").startswith("sessionbert") and r.get("lengths") == "sim"]
    for seq in sorted({r["seq_len"] for r in ours}):
        best = max((r for r in ours if r["seq_len"] == seq), key=lambda r: r["real_tokens_per_s"])
        res[f"real_tokens_per_s_seq{seq}"] = best["real_tokens_per_s"]
        res[f"mfu_seq{seq}"] = best["mfu"]
        res[f"peak_mem_gib_seq{seq}"] = best.get("peak_mem_gib")
        res[f"headline_path_seq{seq}"] = best["label"]
        if "ratio_vs_hf" in best:
            res[f"ratio_vs_hf_seq{seq}"] = best["ratio_vs_hf"]


def _with_switch(variants: list[dict], key: str, mode: str | None) -> list[dict]:
    """Variants extended by one packed-path switch `key`: off everywhere (mode None), off and then on for the packed
    ones ("also"), or on for the packed ones in their place ("only")."""
    return ([v for v in variants if not (v["packed"] and mode == "only")]
            + [{**v, key: True} for v in variants if v["packed"] and mode])


# keys of bench_gpu.json written by other benchmarks (bench_ddp.py, the paper-scale runs, the latest and the earlier
# ones that tests/test_results.py checks beside it): a new run keeps them
CARRIED_PREFIXES = ("ddp_", "paper_scale", "previous_paper_scale")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-lengths", metavar="NPY", help="write the simulator's session token counts and exit")
    p.add_argument("--lengths", default=str(ROOT / ".bench" / "lengths_sim.npy"), help=".npy of session token counts")
    p.add_argument("--extra-lengths", nargs="*", default=[], metavar="NAME=NPY",
                   help="further length distributions to measure too (e.g. msnbc=.bench/msnbc_token_lengths.npy)")
    p.add_argument("--peer", default=DEFAULT_PEER if Path(DEFAULT_PEER).exists() else str(ROOT / ".bench" / "hf_peer_mlm.py"))
    p.add_argument("--no-peer", action="store_true", help="skip the reference")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    # only the shapes both sides define alike (the reference's "small" is 512 wide, ours 256)
    p.add_argument("--model", choices=["base", "tiny"], default="base")
    p.add_argument("--vocab", type=int, default=30000)
    p.add_argument("--pad-multiple", type=int, default=None, help="round batch widths up to this multiple (few shapes)")
    p.add_argument("--tokens-per-step", type=int, default=131072, help="slot (B x T) tokens per step, both paths")
    p.add_argument("--steps", type=int, default=40, help="timed steps of ours")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--peer-steps", type=int, default=None, help="reference's --steps (default: its own, 30)")
    p.add_argument("--peer-warmup", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also measure ours with the encoder under torch.compile(dynamic=True)")
    p.add_argument("--packed", action="store_true",
                   help="also measure ours packed (PackedMLMCollator + varlen attention, pretrain.packed), eager and "
                        "(with --compile) compiled")
    p.add_argument("--only-packed", action="store_true", help="of ours, measure only the packed variants")
    p.add_argument("--compile-ln", choices=["eager", "graph", "both"], default="eager",
                   help="packed + compile: LayerNorm kept eager (default), inside the compiled graph, or both variants")
    for key, what in SWITCH_HELP.items():
        p.add_argument("--" + key.replace("_", "-"), nargs="?", const="also", choices=["also", "only"], default=None,
                       help=f"also (or only) measure every packed variant with {what} (pretrain.{key})")
    p.add_argument("--dropout", type=float, default=0.1, help="ours: hidden dropout (the reference: 0.1)")
    p.add_argument("--pack-multiple", type=int, default=1024, help="packed stream length rounded up to this")
    p.add_argument("--cycle", type=int, default=0, metavar="N",
                   help="cycle N distinct batches (the reference cycles 6); default: every step a new batch")
    p.add_argument("--profile-dir", default=None, help="write a torch.profiler table of 3 steps per run of ours here")
    p.add_argument("--no-sync-check", dest="sync_check", action="store_false",
                   help="drop the per-step isfinite(loss) host sync that MLMModule.training_step does")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul ceiling (H200: ~790 measured)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_gpu.json"))
    p.add_argument("--md", default=None, help="also write the markdown report here")
    a = p.parse_args(argv)
    if a.write_lengths:
        write_lengths(a.write_lengths)
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dists = [("sim", a.lengths)] + [tuple(x.split("=", 1)) for x in a.extra_lengths]
    res = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
               torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               transformers=__import__("transformers").__version__, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               model=a.model, vocab=a.vocab, tokens_per_step=a.tokens_per_step, peak_tflops=a.peak_tflops,
               lengths={}, runs=[])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            old = json.loads(out.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"bench_gpu: {out} is not JSON ({e}); move it away or pass another --out")
        res.update({k: v for k, v in old.items() if k.startswith(CARRIED_PREFIXES)})

    def save():
        headline(res)
        res["table_md"] = table(res)
        out.write_text(json.dumps(res, indent=1) + "\n")
        if a.md:
            Path(a.md).write_text(
                f"# MLM pretraining throughput: SessionBERT vs Hugging Face reference\n\n"
                f"- device: {res['device']}\n- torch {res['torch']} (CUDA {res['cuda']}), transformers "
                f"{res['transformers']}, Python {res['python']}\n- date: {res['date']}\n- command: `{res['command']}`\n"
                f"- model {a.model}, vocab {a.vocab}, {a.tokens_per_step} slot tokens per step, bf16 autocast, SDPA, "
                f"fused AdamW\n- lengths: {json.dumps(res['lengths'])}\n\n{res['table_md']}\n")

    cfg = bert_config(a.vocab, 0, ARCHS[a.model])
    loaded = {name: np.load(path).astype(np.int64) for name, path in dists}
    for name, path in dists:
        lengths = loaded[name]
        # the content's digest: results of different sessions compare only on the same lengths (the file is made by
        # `--write-lengths` from the current simulator and tokenizer, and changed with them in the past)
        res["lengths"][name] = dict(path=str(path), sessions=int(len(lengths)), mean=round(float(lengths.mean()), 2),
                                    median=float(np.median(lengths)),
                                    sha256_16=hashlib.sha256(np.ascontiguousarray(lengths).tobytes()).hexdigest()[:16])
    peers: dict = {}
    # eager runs (and the reference) first, compiled ones last: a run cut short by a time limit loses the least
    variants = [] if a.only_packed else [dict(compile=False, packed=False)] + (
        [dict(compile=True, packed=False)] if a.compile else [])
    if a.packed or a.only_packed:
        variants += [dict(compile=False, packed=True)] + ([dict(compile=True, packed=True)] if a.compile else [])
    # --fused-qkv: every packed variant again with pretrain.fused_qkv (an A/B in the same call)
    variants = _with_switch(variants, "fused_qkv", a.fused_qkv)
    # --compile-ln: compiled packed variants with the LayerNorms eager, in the graph, or both
    lns = {"eager": [False], "graph": [True], "both": [False, True]}[a.compile_ln]
    variants = [{**v, "ln_graph": ln} for v in variants for ln in (lns if v["compile"] and v["packed"] else [False])]
    for key in (k for k in SWITCH_HELP if k != "fused_qkv"):  # --fused-norm etc.: likewise (QKV's is above)
        variants = _with_switch(variants, key, getattr(a, key))
    plan = [(name, path, seq, v) for v in variants for name, path in dists for seq in a.seq_lens]
    for name, path, seq, v in plan:
        lengths = loaded[name]
        suffix = "" if name == "sim" else f"_{name}"
        if (name, seq) not in peers and not a.no_peer:
            try:
                peer = run_peer(a.peer, path, seq, a)
                fl = peer_model_flops_per_real_token(cfg, lengths, seq)
                peer.update(label="HF reference", lengths=name, hf_reported_mfu=peer["mfu"],
                            mfu=round(peer["real_tokens_per_s"] * fl / (a.peak_tflops * 1e12), 4))
                res["runs"].append(peer)
                res[f"hf_real_tokens_per_s_seq{seq}{suffix}"] = peer["real_tokens_per_s"]
                peers[(name, seq)] = peer
                print(json.dumps(peer), flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with ours
                print(f"reference failed: {e}", file=sys.stderr, flush=True)
                peers[(name, seq)] = None
                res.setdefault("errors", []).append(f"reference {name} seq{seq}: {str(e)[-1500:]}")
            save()
        try:
            r = run_ours(lengths, seq, a, device, v)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res.setdefault("errors", []).append(f"{variant_label(v)} {name} seq{seq}: {str(e)[-1500:]}")
            save()
            continue
        r.update(label=variant_label(v), lengths=name)
        tag = f"seq{seq}{suffix}" + variant_tag(v)
        peer = peers.get((name, seq))
        if peer:
            r["ratio_vs_hf"] = round(r["real_tokens_per_s"] / peer["real_tokens_per_s"], 3)
            res[f"ratio_vs_hf_{tag}"] = r["ratio_vs_hf"]
        res[f"real_tokens_per_s_{tag}"] = r["real_tokens_per_s"]
        res[f"mfu_{tag}"] = r["mfu"]
        res[f"peak_mem_gib_{tag}"] = r.get("peak_mem_gib")
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
        save()
    save()
    print(res["table_md"])


if __name__ == "__main__":
    main()
