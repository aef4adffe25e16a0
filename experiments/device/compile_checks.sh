#!/usr/bin/env bash
# One H200 call (~4 min): torch.compile of the packed encoder with the LayerNorms inside the graph and a fixed
# stream length (every step N = 131072, `--pack-multiple 131072`) against eager, seq 128, fused QKV, the
# simulator's lengths; each compiled variant in its own process (a fresh dynamo cache). Results under $OUT.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
C="python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only --seq-lens 128"
$C --pack-multiple 1024 --out $OUT/bench_gpu_eager_pm1024.json 2>&1 | grep '^{' | cut -c1-600
$C --pack-multiple 1024 --compile --compile-ln graph --profile-dir $OUT/pm1024 \
  --out $OUT/bench_gpu_compile_lngraph_pm1024.json 2>&1 | grep -E '^\{|Error' | cut -c1-600
$C --pack-multiple 131072 --compile --compile-ln graph --profile-dir $OUT/pm131072 \
  --out $OUT/bench_gpu_compile_lngraph_pm131072.json 2>&1 | grep -E '^\{|Error' | cut -c1-600
