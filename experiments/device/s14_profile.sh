#!/usr/bin/env bash
# One H200 call, session 14, after s14_bench.sh: (1) the step at seq 64 (the paper scale's), previous commit against
# this tree (#53), after a warm-up, no reference; (2) a torch.profiler table of this tree's step at seq 128 (where the
# GPU time goes now). Needs .bench carried (lengths_sim.npy, old_s14, site/).
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
sw="--only-packed --fused-qkv only --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only"
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens 64 --steps 20 \
  --out /tmp/warm.json > /dev/null 2>&1
for i in 1 2; do
  (cd .bench/old_s14 && python3 experiments/bench_gpu.py --lengths ../lengths_sim.npy --no-peer $sw --seq-lens 64 \
    --out $R/bench_gpu_prev_seq64_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-300)
  python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens 64 \
    --out $R/bench_gpu_rows_seq64_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-300
done
tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens 128 --profile-dir $R \
  --out $R/bench_gpu_profile.json 2>&1 | grep -E '^\||Error' | cut -c1-300
ls $R
tar czf $OUT/results.tgz -C $R . && rm -rf $R
