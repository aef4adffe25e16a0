#!/usr/bin/env python3
"""DDP scaling of SessionBERT's MLM pretraining through Lightning (issue 6, goal 3).

The real training path: `MLMModule` in a Lightning `Trainer` (bf16-mixed, `strategy=ddp` for several GPUs, exactly
what `trainer=ddp` configures), batches from `TokenBudgetBatchSampler` (each rank its own disjoint token-budget
batches, `use_distributed_sampler=False` as in `train_utils.build_trainer`) collated by `MLMCollator` in data-loader
workers. Examples are random in-vocabulary ids with the session-length distribution of `--lengths` capped at
`--seq` (only lengths matter for speed). Weak scaling: every GPU gets the same token budget per step, so the ideal
is N x the one-GPU throughput of real (non-padding) tokens.

    python experiments/bench_ddp.py --lengths .bench/lengths_sim.npy --devices 1,2 --out experiments/results/bench_ddp.json
    python experiments/bench_ddp.py --packed ...   # the packed path (pretrain.packed=true): PackedMLMCollator, varlen

With `--packed` the batches go through `PackedMLMCollator` (what `pretrain.packed=true` trains with; attention-
probability dropout 0) and real tokens are the collator's count.

Epochs: the lengths file holds ~24k sessions, 20 batches of 131k slots on one GPU and 10 per rank on two. The 70
steps of a run over it cross 3 epoch boundaries on one GPU and 6 on two; each boundary stalls the GPU (the loop's
end-of-epoch work, the loader's new iterator) and follows a partly filled batch. That cost grows with the device
count and with the tokens per step (fewer batches per epoch), and it is not the paper-scale workload (9M sessions:
one epoch of thousands of steps). So by default the lengths are tiled (the ids still differ: they are seeded by
index) until one epoch holds the warm-up and the timed steps on every rank, for the largest device count of the
sweep; every run of the sweep gets the same copies, so they train on the same batches' fill (different tilings pack
a little differently: 1.9% more real tokens per step in one session-15 run). `--no-tile` measures the small file as
it is (what sessions 2-15 reported up to 15's call 1).

For each device count the script launches itself (`--child`) so that each measurement starts clean; Lightning
starts the DDP processes. Timing starts after `--warmup` steps (NCCL set-up, cuDNN/cuBLAS heuristics) and covers
`--steps` steps; real tokens are summed over ranks with an all-reduce.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Ids:
    """Random ids of the given lengths ([CLS] ... [SEP]); deterministic per index."""

    def __init__(self, lengths: np.ndarray, vocab: int):
        self.lengths, self.vocab = lengths, vocab

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(int(i))
        n = int(self.lengths[i])
        ids = torch.randint(6, self.vocab, (n,), generator=g)
        ids[0], ids[-1] = 2, 3
        return {"idx": i, "input_ids": ids}


def child(a) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from sessionbert.data.datasets import MLMCollator, PackedMLMCollator
    from sessionbert.data.sampler import TokenBudgetBatchSampler
    from sessionbert.models.encoder import ARCHS, bert_config
    from sessionbert.models.modules import MLMModule

    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.is_available()

    def _sync():
        if gpu:
            torch.cuda.synchronize()
    lengths = capped_lengths(a.lengths, a.seq)
    tiles = a.tiles  # the parent's choice (1 with --no-tile), the same for every run of the sweep
    lengths = np.tile(lengths, tiles)
    cfg = bert_config(a.vocab, 0, ARCHS[a.model], 512, 0.1)
    if a.packed:  # as stage_pretrain: the varlen kernel has no attention-probability dropout
        cfg.attention_probs_dropout_prob = 0.0
    module = MLMModule(cfg.to_dict(), lr=1e-4, **{k: getattr(a, k) and a.packed for k in FUSED})
    sampler = TokenBudgetBatchSampler(lengths, a.tokens_per_step, shuffle=True, seed=0)
    coll = MLMCollator(0, 4, a.vocab, [0, 1, 2, 3, 4, 5], 0.15, seed=0)
    if a.packed:
        coll = PackedMLMCollator(coll, max_len=a.seq)
    dl = DataLoader(_Ids(lengths, a.vocab), batch_sampler=sampler, collate_fn=coll, num_workers=a.workers,
                    pin_memory=True, persistent_workers=a.workers > 0, prefetch_factor=4 if a.workers else None)

    class Clock(L.Callback):
        def __init__(self):
            self.tokens, self.t0, self.t1, self.epochs = 0, None, None, set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == a.warmup:
                _sync()
                self.t0 = time.perf_counter()
            if trainer.global_step >= a.warmup:
                self.epochs.add(trainer.current_epoch)
                self.tokens += int(batch["real_tokens"]) if "real_tokens" in batch else int(
                    batch["attention_mask"].sum())

        def on_train_end(self, trainer, pl_module):
            _sync()
            self.t1 = time.perf_counter()
            t = torch.tensor([float(self.tokens)], device=pl_module.device)
            if trainer.world_size > 1:
                torch.distributed.all_reduce(t)
            if trainer.is_global_zero:
                secs = self.t1 - self.t0
                res = {"devices": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                       "ddp_kwargs": a.ddp_kwargs, "comm_hook": a.comm_hook, "seq": a.seq, "model": a.model,
                       "steps": a.steps,
                       "packed": bool(a.packed), **{k: bool(getattr(a, k) and a.packed) for k in FUSED},
                       "tokens_per_step_per_gpu": a.tokens_per_step, "sessions": len(lengths), "tiles": tiles,
                       "epochs_timed": len(self.epochs), "real_tokens": int(t.item()), "seconds": secs,
                       "real_tokens_per_s": t.item() / secs,
                       "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}
                Path(a.child).write_text(json.dumps(res))

    strategy = "auto"
    if a.devices > 1 or a.ddp_on_one:
        from lightning.pytorch.strategies import DDPStrategy

        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # bf16 / fp16: gradients all-reduced in half precision (half the bytes)
        hook = {"none": None, "bf16": default_hooks.bf16_compress_hook,
                "fp16": default_hooks.fp16_compress_hook}[a.comm_hook]
        strategy = DDPStrategy(ddp_comm_hook=hook, **ddp_kwargs(a.ddp_kwargs))  # Lightning's DDP, as `trainer=ddp`
    profiler = None
    if a.profile_dir:  # Lightning's wrapper of torch.profiler, a few steps after the warm-up, one table per rank
        from lightning.pytorch.profilers import PyTorchProfiler

        profiler = PyTorchProfiler(dirpath=a.profile_dir, filename=f"ddp{a.devices}", row_limit=40,
                                   export_to_chrome=False,
                                   sort_by_key="cuda_time_total" if gpu else "cpu_time_total",
                                   schedule=torch.profiler.schedule(wait=a.warmup, warmup=1, active=3, repeat=1))
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=a.devices, strategy=strategy, profiler=profiler,
                        precision="bf16-mixed" if gpu else "32-true", max_steps=a.warmup + a.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(module, dl)


# packed-path switches, each a --flag here (with what it runs, for its help) and an MLMModule / pretrain.* knob of the
# same name
FUSED = {"fused_qkv": "one Q/K/V GEMM", "fused_norm": "Triton dropout-add-LayerNorm", "fused_gelu": "Triton bias + GELU",
         "fused_residual": "residual gradient summed in the branch GEMMs", "fused_ce": "Triton MLM cross-entropy",
         "fused_attention": "Triton attention for short sessions"}


def capped_lengths(path: str, seq: int) -> np.ndarray:
    """The session lengths of the file at `path`, capped at `seq`; sessions shorter than [CLS] x [SEP] left out."""
    lengths = np.minimum(np.load(path).astype(np.int64), seq)
    return lengths[lengths >= 3]


def epoch_tiles(lengths: np.ndarray, tokens_per_step: int, devices: int, steps: int) -> int:
    """How many copies of `lengths` make one epoch of `TokenBudgetBatchSampler` hold `steps` + 1 batches on each of
    `devices` ranks (no epoch boundary inside the run)."""
    from sessionbert.data.sampler import TokenBudgetBatchSampler

    def per_rank(k: int) -> int:
        return len(TokenBudgetBatchSampler(np.tile(lengths, k), tokens_per_step, shuffle=True, seed=0,
                                           num_replicas=devices, rank=0))

    need = steps + 1
    k = max(1, -(-need // max(1, per_rank(1))))  # the estimate; packing is not exactly linear in the copies
    while per_rank(k) < need:
        k += 1
    while k > 1 and per_rank(k - 1) >= need:
        k -= 1
    return k


def sweep_tiles(lengths: np.ndarray, tokens_per_step: int, device_counts: list[int], steps: int) -> int:
    """The copies every run of a sweep over `device_counts` uses: enough for the one with the fewest batches per
    rank."""
    return max(epoch_tiles(lengths, tokens_per_step, d, steps) for d in device_counts)


def schedule(counts: list[int], rounds: int) -> list[tuple[int, int]]:
    """(round, device count) in the order they run: the counts, then reversed in every other round (1,2 then 2,1), so
    a drift over the call (the first process of a call runs slow, session 13) does not favour one count."""
    return [(r + 1, d) for r in range(rounds) for d in (counts if r % 2 == 0 else counts[::-1])]


def mean_rates(runs: list[dict]) -> dict[int, float]:
    """Mean real tokens/s per device count over the rounds, by device count."""
    by: dict[int, list[float]] = {}
    for r in runs:
        by.setdefault(r["devices"], []).append(r["real_tokens_per_s"])
    return {d: sum(v) / len(v) for d, v in sorted(by.items())}


def scaling(runs: list[dict], devices: int = 2) -> float | None:
    """Mean throughput on `devices` GPUs over the mean on one (None without both): the goal's `ddp_scaling_2gpu`."""
    rates = mean_rates(runs)
    return rates[devices] / rates[1] if 1 in rates and devices in rates else None


def ddp_kwargs(spec: str) -> dict:
    """"static_graph=true,bucket_cap_mb=100" -> keyword arguments of torch's DistributedDataParallel (through
    Lightning's DDPStrategy): true / false, integers and floats as such; names DDP does not take are refused (the
    pipeline's `trainer.ddp_kwargs` check, `config.ddp_option_names`)."""
    from sessionbert.config import ddp_option_names

    known, out = ddp_option_names(), {}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench_ddp: --ddp-kwargs item {item!r} is not key=value")
        if key not in known:
            raise SystemExit(f"bench_ddp: --ddp-kwargs {key!r} is not an option of DistributedDataParallel "
                             f"(one of {sorted(known)})")
        low = val.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(val)
            except ValueError:
                try:
                    out[key] = float(val)
                except ValueError:
                    out[key] = val
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=str(ROOT / ".bench" / "lengths_sim.npy"))
    ap.add_argument("--devices", default="1,2", help="device counts to measure, e.g. 1,2")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="base")
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--tokens-per-step", type=int, default=131072, help="padded slots per step per GPU")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--packed", action="store_true", help="the packed path (pretrain.packed=true)")
    for knob, what in FUSED.items():
        ap.add_argument("--" + knob.replace("_", "-"), action="store_true", help=f"packed: {what} (pretrain.{knob})")
    ap.add_argument("--ddp-kwargs", default="", help="DistributedDataParallel options through Lightning's DDPStrategy, "
                    "e.g. static_graph=true,gradient_as_bucket_view=true,bucket_cap_mb=100")
    ap.add_argument("--comm-hook", choices=("none", "bf16", "fp16"), default="none",
                    help="torch's DDP communication hook: gradients compressed to bf16 / fp16 for the all-reduce")
    ap.add_argument("--ddp-on-one", action="store_true",
                    help="the one-device run under DDP too: the wrapper's cost without communication")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every device count this many times, alternating the order (1,2,2,1,...); the "
                    "scaling is the ratio of the means")
    ap.add_argument("--no-tile", dest="tile", action="store_false",
                    help="time over the lengths file as it is, epoch boundaries included (see the module's doc)")
    ap.add_argument("--tiles", type=int, default=1, help=argparse.SUPPRESS)  # the parent's choice, for its children
    ap.add_argument("--profile-dir", help="write a torch.profiler table per rank of 3 steps after the warm-up here "
                    "(Lightning's PyTorchProfiler; the timed throughput then includes the profiler's cost)")
    ap.add_argument("--out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ddp_kwargs(a.ddp_kwargs)  # a malformed item stops here, before any run
    if a.rounds < 1:
        raise SystemExit(f"bench_ddp: --rounds must be at least 1, got {a.rounds}")
    if a.child:
        a.devices = int(a.devices)
        return child(a)
    import torch

    runs, counts = [], [int(x) for x in a.devices.split(",")]
    steps = a.warmup + a.steps
    tiles = sweep_tiles(capped_lengths(a.lengths, a.seq), a.tokens_per_step, counts, steps) if a.tile else 1
    for rnd, d in schedule(counts, a.rounds):
        # a file of this process's own: two benchmarks run at once (one per GPU) must not read each other's result
        res_file = Path(tempfile.gettempdir()) / f"bench_ddp_{os.getpid()}_{d}.json"
        res_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", str(res_file), "--devices", str(d), "--lengths", a.lengths,
               "--seq", str(a.seq), "--model", a.model, "--vocab", str(a.vocab), "--tokens-per-step",
               str(a.tokens_per_step), "--steps", str(a.steps), "--warmup", str(a.warmup), "--workers", str(a.workers),
               "--ddp-kwargs", a.ddp_kwargs, "--comm-hook", a.comm_hook] + (["--ddp-on-one"] if a.ddp_on_one else [])
        cmd += ["--tiles", str(tiles)]
        cmd += ["--profile-dir", a.profile_dir] if a.profile_dir else []
        cmd += (["--packed"] if a.packed else []) + ["--" + k.replace("_", "-") for k in FUSED if getattr(a, k)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        runs.append({**json.loads(res_file.read_text()), "round": rnd})
        print(json.dumps(runs[-1]), flush=True)
        out = summary(runs, a.rounds, torch)
        if a.out:  # after every run: a sweep stopped by a time limit keeps the runs it finished
            Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def summary(runs: list[dict], rounds: int, torch) -> dict:
    """The output file: the runs so far, the mean throughput per device count, the efficiency per device against the
    fewest devices measured, and `ddp_scaling_2gpu` once one and two GPUs are both there."""
    rates = mean_rates(runs)
    low = min(rates)
    out = {"date": dt.date.today().isoformat(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "rounds": rounds, "runs": runs, "mean_real_tokens_per_s": {str(d): r for d, r in rates.items()},
           "per_device_efficiency": {str(d): r * low / (rates[low] * d) for d, r in rates.items()}}
    ratio = scaling(runs)
    if ratio is not None:
        out["ddp_scaling_2gpu"] = ratio
    return out


if __name__ == "__main__":
    main()
