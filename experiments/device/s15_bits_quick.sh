#!/usr/bin/env bash
# One H200 call (~3 min, the last ~280 device-seconds of session 15): a short form of dropout_bits_ab.sh: seq 128 only,
# no reference, a warm-up process, then shipped / bits / shipped / bits (tar after each). Needs .bench carried.
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R .bench/old_bits
cp -r sessionbert conf experiments .bench/old_bits/
P=experiments/results/kernel_sass_s14/dropout_bits.patch
{ git apply $P || patch -p1 < $P; } > $R/patch.txt 2>&1 || { cat $R/patch.txt; exit 1; }
sw="--only-packed --fused-qkv only --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only"
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens 128 --steps 20 --out /tmp/w.json > /dev/null 2>&1
for i in 1 2; do
  (cd .bench/old_bits && python3 experiments/bench_gpu.py --lengths ../lengths_sim.npy --no-peer $sw --seq-lens 128 \
    --out $R/shipped_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-200)
  tar czf $OUT/results.tgz -C $R .
  python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens 128 \
    --out $R/bits_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-200
  tar czf $OUT/results.tgz -C $R .
done
rm -rf $R
