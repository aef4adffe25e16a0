#!/usr/bin/env bash
# One H200 call (~3 min, the last ~280 device-seconds of session 15): a short form of dropout_bits_ab.sh: seq 128 only,
# no reference, a warm-up process, then shipped / bits / shipped / bits (tar after each). Needs .bench carried.
# Its loop is step_ab.sh's ab_pair since session 16: the same runs.
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R .bench/old_bits
cp -r sessionbert conf experiments .bench/old_bits/
P=experiments/results/kernel_sass_s14/dropout_bits.patch
{ git apply $P || patch -p1 < $P; } > $R/patch.txt 2>&1 || { cat $R/patch.txt; exit 1; }
source experiments/device/step_ab.sh
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $STEP_SW --seq-lens 128 --steps 20 \
  --out /tmp/w.json > /dev/null 2>&1
for i in 1 2; do OLD=.bench/old_bits ab_pair shipped_$i bits_$i; done
rm -rf $R
