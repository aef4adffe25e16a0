#!/usr/bin/env bash
# One H200 call (~4 min), session 8, after fused_kernels_final.sh: the bias + GELU kernels with int32 offsets (were
# int64): the kernels alone with the autotuner's picks, and the packed step with and without fused GELU beside the
# HF reference, seq 128 and 512.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
python3 experiments/device/autotune_report.py --out $OUT/bench_fused_norm.json > $OUT/autotune.txt 2>&1
tail -2 $OUT/autotune.txt | cut -c1-300
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py --only-packed \
  --fused-qkv only --fused-norm only --fused-gelu also --seq-lens 128 512 \
  --out $OUT/bench_gpu_fusedgelu.json --md $OUT/bench_gpu_fusedgelu.md 2>&1 | grep -E '^\||Error' | cut -c1-300
