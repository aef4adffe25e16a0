#!/usr/bin/env bash
# The last two nvidia-h200-x2 commands of session 14, as they ran (each was one `run` call; PART picks one):
# PART=262k: one and two GPUs at 262,144 slots per GPU (fused_kernels_dev/s14_call6_ddp_262k/);
# PART=solo: one-GPU benchmarks on both GPUs at once, no DDP (fused_kernels_dev/s14_call7_two_solo/). When it ran,
# bench_ddp.py wrote its child's result to /tmp/bench_ddp_<devices>.json, shared by both processes, so both logs show
# the same run; it now writes one file per process. Needs .bench carried (lengths_sim.npy, site/).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1
mkdir -p $OUT/r
sw="--lengths .bench/lengths_sim.npy --packed --fused-qkv --fused-norm --fused-gelu --fused-residual --fused-ce --fused-attention"
if [ "$PART" = 262k ]; then
  python3 experiments/bench_ddp.py $sw --devices 1,2 --tokens-per-step 262144 --steps 40 --out $OUT/r/ddp_262k.json \
    > $OUT/r/e.log 2>&1
  tail -12 $OUT/r/e.log
else
  CUDA_VISIBLE_DEVICES=0 python3 experiments/bench_ddp.py $sw --devices 1 --steps 40 --out $OUT/r/solo0.json \
    > $OUT/r/s0.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 python3 experiments/bench_ddp.py $sw --devices 1 --steps 40 --out $OUT/r/solo1.json \
    > $OUT/r/s1.log 2>&1
  wait
  grep -h '"real_tokens_per_s"' $OUT/r/solo*.json
  nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
fi
tar czf $OUT/results.tgz -C $OUT/r . && rm -rf $OUT/r
