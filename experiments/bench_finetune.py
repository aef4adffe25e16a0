#!/usr/bin/env python3
"""Fine-tuning wall time vs seq_len (issue 6, goal 2): fixed padded batches against length bucketing.

The paper saw fine-tuning 10x slower at seq_len 512 than at 64. For each seq_len (default 64, 128, 256, 512) the
same pretrained encoder is fine-tuned on the same simulated data through the pipeline's own `stage_finetune`,
twice:
  padded    finetune.max_tokens=null: batches of --batch-size prefixes, each padded to its longest prefix (the
            fixed-batch path, the CPU default)
  bucketed  finetune.max_tokens=--max-tokens, finetune.pad_to_multiple_of=--pad-multiple: prefixes of similar
            length together, B x T <= max_tokens padded slots per batch (the GPU default, `trainer=gpu`)
Per run: wall time of the fit (training only: validation is switched off during the fit, checkpoints too),
train batches, real (non-pad) tokens and padded slots processed (the stage's TokenCounter), real tokens/s,
slots/s, seconds per million real tokens and per million slots, and test hit@5 and F1 micro of both heads (a
check that both paths learn alike). The summary gives each path's time ratio between the longest and shortest
seq_len next to its real-token and padded-slot ratios: a path whose time grows with real tokens, not with slots,
has a time ratio near its real-token ratio.

Everything is simulated here (nothing is downloaded): `--users` simulated users (~13.7 sessions each over the
default 6 months: ~48k sessions at the default 3500, ~100k at 7500), one WordPiece tokenizer, and one short MLM
pretraining at the longest seq_len (`--pretrain-steps`, the encoder all runs start from); fine-tuning at `--lr`
(a BERT-base rate; the timing does not depend on it). On one H200 (BERT-base shape) the default arguments take
about 4.5 min, `--users 7500` about 8 min. In these short runs F1 micro came out the same in every run (on CPU
too: the argmax is mostly the majority class after one epoch of one prefix per session); hit@5 tells runs apart:

    python3 experiments/bench_finetune.py --device cuda --out experiments/results/bench_finetune_gpu.json
    # CPU smoke check (tiny model, 200 users; CPU times are not GPU results):
    python experiments/bench_finetune.py --device cpu --arch tiny --users 200 --batch-size 32 --max-tokens 2048 \\
        --pretrain-steps 5 --out experiments/results/bench_finetune_cpu.json

Extra Hydra overrides for every run go after `--` (e.g. `-- runtime.num_workers=8`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: trainer=gpu (bf16-mixed); cpu: trainer=cpu")
    ap.add_argument("--arch", default="base", help="model.arch: tiny | small | base (BERT-base shape)")
    ap.add_argument("--users", type=int, default=3500, help="simulated users (~13.7 sessions each)")
    ap.add_argument("--seq-lens", default="64,128,256,512")
    ap.add_argument("--batch-size", type=int, default=128, help="padded path: prefixes per batch")
    ap.add_argument("--max-tokens", type=int, default=16384, help="bucketed path: padded slots per batch (B x T)")
    ap.add_argument("--pad-multiple", type=int, default=32, help="bucketed path: finetune.pad_to_multiple_of")
    ap.add_argument("--prefixes", type=int, default=1, help="finetune.train_prefixes_per_session")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5, help="finetune.lr")
    ap.add_argument("--pretrain-steps", type=int, default=50, help="MLM steps of the shared encoder (>= 1)")
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--workers", type=int, default=None, help="runtime.num_workers (default: 4 on cuda, 0 on cpu)")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="padded path's test batches (default: 1024 "
                    "on cuda, 256 on cpu); the bucketed path's test batches use --max-tokens")
    ap.add_argument("--modes", default="padded,bucketed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--md", help="also write the markdown table here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return ap.parse_args()


def make_cfg(work: Path, overrides: list[str]):
    """The pipeline's Hydra config (as train.py composes it) with outputs and cache under `work`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root, cfg.paths.output_dir, cfg.paths.cache_dir = str(work), str(work / "run"), str(work / "cache")
    return cfg


def _git() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - a copy of the tree without .git
        return None


def main() -> None:
    a = _args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lightning as L
    import torch

    from sessionbert.config import validate
    from sessionbert.pipeline import Run, stage_data, stage_finetune, stage_pretrain, stage_tokenizer

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --device cpu for the smoke check)")
    seq_lens = [int(x) for x in a.seq_lens.split(",")]
    modes = a.modes.split(",")
    workers = a.workers if a.workers is not None else (4 if a.device == "cuda" else 0)
    eval_bs = a.eval_batch_size or (1024 if a.device == "cuda" else 256)
    work = Path(a.work or tempfile.mkdtemp(prefix="sessionbert-bench-ft-"))
    base = [f"trainer={'gpu' if a.device == 'cuda' else 'cpu'}", "logger=csv", "data.size=default",
            f"+data.overrides.n_users={a.users}", f"model.arch={a.arch}", f"vocab_size={a.vocab}",
            f"seed={a.seed}", "cache.enabled=false", "callbacks.checkpoint=false", "callbacks.lr_monitor=false",
            "callbacks.model_summary=false", "callbacks.progress=none",
            f"finetune.epochs={a.epochs}", f"finetune.batch_size={a.batch_size}", f"finetune.lr={a.lr}",
            f"finetune.train_prefixes_per_session={a.prefixes}", "finetune.eval_prefixes_per_session=1",
            f"runtime.num_workers={workers}", f"runtime.eval_batch_size={eval_bs}", *a.overrides]
    mode_args = {"padded": ["finetune.max_tokens=null", "finetune.pad_to_multiple_of=null"],
                 "bucketed": [f"finetune.max_tokens={a.max_tokens}", f"finetune.pad_to_multiple_of={a.pad_multiple}"]}

    # ---- shared: simulated data, tokenizer, one short MLM pretraining at the longest seq_len ----------------
    t0 = time.perf_counter()
    cfg = make_cfg(work, [*base, f"seq_len={max(seq_lens)}", f"trainer.limit_train_batches={a.pretrain_steps}",
                          "pretrain.val_max_sessions=200"])
    validate(cfg)
    L.seed_everything(a.seed, workers=True)
    run = Run(cfg)
    stage_data(run)
    stage_tokenizer(run)
    enc_dir = stage_pretrain(run)
    prep_s = time.perf_counter() - t0
    print(f"prepared in {prep_s:.1f} s: {run.metrics['data']} (pretrain {run.metrics['pretrain'].get('seconds')} s)",
          flush=True)

    def finetune(seq_len: int, mode: str, extra: list[str] = ()) -> dict:
        c = make_cfg(work, [*base, f"seq_len={seq_len}", "trainer.limit_val_batches=0", *mode_args[mode], *extra])
        validate(c)
        run.cfg = c  # same Run: the corpus (events, split, serialisation) is built once
        L.seed_everything(a.seed, workers=True)
        stage_finetune(run, enc_dir)
        return dict(run.metrics["finetune"])

    # warm-up (not reported): CUDA context, cuBLAS / SDPA kernel selection, data-loader workers
    tw = time.perf_counter()
    finetune(min(seq_lens), modes[-1], ["trainer.limit_train_batches=10"])
    print(f"warm-up {time.perf_counter() - tw:.1f} s", flush=True)

    rows = []
    for seq_len in seq_lens:
        for mode in modes:
            m = finetune(seq_len, mode)
            s = m["seconds"]
            row = {"seq_len": seq_len, "mode": mode, "seconds": s, "stage_seconds": m["stage_seconds"],
                   "train_examples": m["train_examples"], "train_batches": m["train_batches"],
                   "real_tokens": m["real_tokens"], "padded_slots": m["padded_slots"],
                   "pad_fraction": m["pad_fraction"], "tokens_per_example_mean": round(m["tokens_per_example_mean"], 2),
                   "real_tokens_per_s": round(m["real_tokens"] / s, 1), "slots_per_s": round(m["padded_slots"] / s, 1),
                   "s_per_M_real_tokens": round(s / (m["real_tokens"] / 1e6), 3),
                   "s_per_M_slots": round(s / (m["padded_slots"] / 1e6), 3),
                   "max_batch_slots": m["max_batch_slots"],
                   "page_f1_micro": round(m["page_f1_micro"], 4), "service_f1_micro": round(m["service_f1_micro"], 4),
                   "page_hit@5": round(m["page_hit@5"], 4), "service_hit@5": round(m["service_hit@5"], 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    summary = {}
    lo, hi = min(seq_lens), max(seq_lens)
    for mode in modes:
        r = {x["seq_len"]: x for x in rows if x["mode"] == mode}
        summary[mode] = {f"time_ratio_{hi}_vs_{lo}": round(r[hi]["seconds"] / r[lo]["seconds"], 2),
                         f"real_tokens_ratio_{hi}_vs_{lo}": round(r[hi]["real_tokens"] / r[lo]["real_tokens"], 2),
                         f"padded_slots_ratio_{hi}_vs_{lo}": round(r[hi]["padded_slots"] / r[lo]["padded_slots"], 2)}
    if {"padded", "bucketed"} <= set(modes):
        p = {x["seq_len"]: x for x in rows if x["mode"] == "padded"}
        b = {x["seq_len"]: x for x in rows if x["mode"] == "bucketed"}
        summary["speedup_bucketed_vs_padded"] = {str(n): round(p[n]["seconds"] / b[n]["seconds"], 2) for n in seq_lens}
    dev = (torch.cuda.get_device_name(0) if a.device == "cuda"
           else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    res = {"bench": "finetune_time_vs_seq_len",
           "label": "GPU run" if a.device == "cuda" else "CPU SMOKE CHECK ONLY: tiny setting, not GPU timings",
           "device": dev, "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "args": vars(a), "overrides": base, "data": run.metrics["data"], "prepare_seconds": round(prep_s, 1),
           "pretrain": {k: run.metrics["pretrain"].get(k) for k in ("seconds", "train_sessions", "mlm_loss")},
           "runs": rows, "summary": summary, "torch": torch.__version__, "lightning": L.__version__,
           "python": platform.python_version(), "torch_threads": torch.get_num_threads(), "git": _git(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    md = _markdown(res)
    print(md)
    print(json.dumps(summary))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if a.md:
        Path(a.md).write_text(md + "\n")


def _markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"Fine-tuning time vs seq_len on {res['device']} ({res['label']}): model.arch={a['arch']}, "
             f"{res['data'].get('n_sessions')} simulated sessions ({a['users']} users), {a['epochs']} epoch(s), "
             f"padded = {a['batch_size']} prefixes per batch, bucketed = <= {a['max_tokens']} slots per batch "
             f"(widths rounded up to {a['pad_multiple']}).", "",
             "| seq_len | path | fit s | batches | real tokens | padded slots | pad % | real tok/s | s / M real tok "
             "| s / M slots | page hit@5 | service hit@5 | page F1 | service F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['seq_len']} | {r['mode']} | {r['seconds']:.2f} | {r['train_batches']} | {r['real_tokens']:,} "
                     f"| {r['padded_slots']:,} | {100 * (r['pad_fraction'] or 0):.1f} | {r['real_tokens_per_s']:,.0f} "
                     f"| {r['s_per_M_real_tokens']:.2f} | {r['s_per_M_slots']:.2f} | {r['page_hit@5']:.3f} "
                     f"| {r['service_hit@5']:.3f} | {r['page_f1_micro']:.3f} "
                     f"| {r['service_f1_micro']:.3f} |")
    lines.append("")
    for mode, s in res["summary"].items():
        lines.append(f"- {mode}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
