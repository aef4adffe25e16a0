#!/usr/bin/env bash
# One H200 call (~3 min), session 8, after fused_kernels_bench.sh: the LayerNorm backward with an unrolled loop among
# its autotuned configs (kernels alone, with the autotuner's picks), then a torch.profiler table of the packed step
# with and without fused GELU (seq 128, no reference: where the step's time goes). It ran out of its 420 s limit
# while autotuning the unrolled configs (results/fused_kernels_dev/call2_unrolled_timeout); the unrolled variant is
# gone, so this now runs the shipped kernels. --compare-module needs
#   git show ad1066a:sessionbert/models/fused_norm.py > experiments/device/_fused_norm_ad1066a.py  (uncommitted)
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
python3 experiments/device/autotune_report.py --out $OUT/bench_fused_norm.json \
  --compare-module experiments/device/_fused_norm_ad1066a.py > $OUT/autotune.txt 2>&1
grep '^{' $OUT/bench_fused_norm.json | cut -c1-200; tail -4 $OUT/autotune.txt | cut -c1-700
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm only --fused-gelu also --seq-lens 128 --steps 30 --profile-dir $OUT --out $OUT/bench_gpu_profile.json \
  2>&1 | grep -E '^\||Error' | cut -c1-300
