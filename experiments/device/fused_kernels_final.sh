#!/usr/bin/env bash
# One H200 call (~5 min), session 8, the shipped kernels (LayerNorm backward with 2D partial sums and the dense bias
# folded in; bias + GELU): correctness against fp32 eager (fused_norm_check.py); the kernels alone with the
# autotuner's picks (autotune_report.py); packed MLM throughput with and without fused GELU beside the HF reference,
# seq 128 and 512, with a torch.profiler table of each of our runs (bench_gpu.py --profile-dir).
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/device.txt
python3 experiments/device/fused_norm_check.py 2>&1 | tail -3 > $OUT/fused_norm_check.json
python3 experiments/device/autotune_report.py --out $OUT/bench_fused_norm.json > $OUT/autotune.txt 2>&1
tail -4 $OUT/autotune.txt | cut -c1-400
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py --only-packed \
  --fused-qkv only --fused-norm only --fused-gelu also --seq-lens 128 512 --profile-dir $OUT/profiles \
  --out $OUT/bench_gpu_fusedgelu.json --md $OUT/bench_gpu_fusedgelu.md 2>&1 | grep -E '^\||Error' | cut -c1-300
