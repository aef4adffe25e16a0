#!/usr/bin/env bash
# One H200 call (~2 min), session 8: does the per-step loss check (a host sync before backward, as
# MLMModule.training_step does) cost throughput? The shipped packed step at seq 128, with and without it
# (bench_gpu.py --no-sync-check), two processes, no reference.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
for flag in "" --no-sync-check; do
  python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
    --fused-norm only --fused-gelu only --seq-lens 128 $flag --out $OUT/bench_gpu_sync${flag:+_nosync}.json 2>&1 \
    | grep -E '^\| ours|Error' | cut -c1-300
done
