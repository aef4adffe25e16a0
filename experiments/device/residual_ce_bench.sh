#!/usr/bin/env bash
# One H200 call (~5 min), session 9: the residual gradient summed in the branch GEMMs (pretrain.fused_residual) and
# the Triton MLM cross-entropy (pretrain.fused_ce). Correctness against fp32 eager (fused_norm_check.py: every
# variant, and the cross-entropy kernels alone at the MLM's shape); packed MLM throughput of the shipped variant
# (fused QKV + norm + GELU) with and without each, beside the HF reference, seq 128 and 512 (a same-call A/B); then a
# torch.profiler table of the step with everything on, seq 128.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/device.txt
python3 experiments/device/fused_norm_check.py 2>&1 | tail -3 > $OUT/fused_check.json
tail -c 1500 $OUT/fused_check.json
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py --only-packed \
  --fused-qkv only --fused-norm only --fused-gelu only --fused-residual also --fused-ce also --seq-lens 128 512 \
  --out $OUT/bench_gpu_residual_ce.json --md $OUT/bench_gpu_residual_ce.md 2>&1 | grep -E '^\||Error' | cut -c1-300
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --seq-lens 128 --steps 12 \
  --profile-dir $OUT/profiles --out $OUT/profile_run.json 2>&1 | grep -E '^\||Error' | cut -c1-300
