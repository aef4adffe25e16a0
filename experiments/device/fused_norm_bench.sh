#!/usr/bin/env bash
# One H200 call (~4 min): the Triton dropout + add + LayerNorm kernels (pretrain.fused_norm):
#   1. correctness against the eager packed path, BERT-base (fused_norm_check.py);
#   2. the kernels alone against eager (bench_fused_norm.py);
#   3. packed MLM throughput, fused QKV, with and without them, beside the HF reference, seq 128 and 512, the
#      simulator's lengths, one process (bench_gpu.py).
# Needs .whl/site and .bench (lengths_sim.npy, hf_peer_mlm.py) carried. Results under $OUT.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
python3 experiments/device/fused_norm_check.py 2>&1 | tail -3 | tee $OUT/fused_norm_check.json
python3 experiments/bench_fused_norm.py --out $OUT/bench_fused_norm.json 2>&1 | grep '^{' | cut -c1-300
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py --only-packed \
  --fused-qkv only --fused-norm also --seq-lens 128 512 --out $OUT/bench_gpu_fusednorm.json \
  --md $OUT/bench_gpu_fusednorm.md 2>&1 | grep -E '^\{|Error|^\|' | cut -c1-400
