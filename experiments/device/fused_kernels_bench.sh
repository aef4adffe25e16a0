#!/usr/bin/env bash
# One H200 call (~5 min), session 8: the second LayerNorm backward (2D partial sums, ROWS autotuned, dense bias
# folded in) and the bias + GELU kernels (pretrain.fused_gelu):
#   1. correctness of every fused variant against fp32 eager, BERT-base (fused_norm_check.py);
#   2. the kernels alone against eager and against the session-7 kernels (bench_fused_norm.py --compare-module;
#      experiments/device/_fused_norm_ad1066a.py is `git show ad1066a:sessionbert/models/fused_norm.py`, written
#      before the call and left uncommitted), with the autotuner's picks;
#   3. packed MLM throughput, fused QKV + fused norm, with and without fused GELU, beside the HF reference, seq 128
#      and 512, the simulator's lengths, one process (bench_gpu.py).
# Needs .whl/site and .bench (lengths_sim.npy, hf_peer_mlm.py) carried. Results under $OUT.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/device.txt
python3 experiments/device/fused_norm_check.py 2>&1 | tail -3 | tee $OUT/fused_norm_check.json
python3 experiments/device/autotune_report.py --out $OUT/bench_fused_norm.json \
  --compare-module experiments/device/_fused_norm_ad1066a.py > $OUT/autotune.txt 2>&1
grep '^{' $OUT/bench_fused_norm.json | cut -c1-260; tail -8 $OUT/autotune.txt | cut -c1-600
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py --only-packed \
  --fused-qkv only --fused-norm only --fused-gelu also --seq-lens 128 512 --out $OUT/bench_gpu_fusedgelu.json \
  --md $OUT/bench_gpu_fusedgelu.md 2>&1 | grep -E '^\{|Error|^\|' | cut -c1-400
