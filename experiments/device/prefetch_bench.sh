#!/usr/bin/env bash
# One H200 call (~5 min), session 11: the row-wise kernels (fused LayerNorm, bias + GELU) with PREFETCH loops offered
# to their autotuners (notes_speed.md #42). The kernels alone against eager and against session 10's fused_norm.py
# (bench_fused_norm.py --compare-module), the autotuner's timing of every config (autotune_report.py: PREFETCH on and
# off side by side); then the step: session 10's code (.bench/old_s10, a `git archive 5553c53` of sessionbert/,
# conf/ and the two benchmarks) and this tree, every switch on, one after the other in this call, this tree beside
# the HF reference, seq 128 and 512.
export PYTHONPATH=$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $R/device.txt
python3 experiments/device/autotune_report.py --compare-module .bench/old_s10/sessionbert/models/fused_norm.py \
  --out $R/bench_fused_norm.json > $R/autotune_report.txt 2>&1; grep -v Warning $R/autotune_report.txt | cut -c1-700
source experiments/device/step_ab.sh
OLD=.bench/old_s10 step_ab s10code prefetch
tar czf $OUT/results.tgz -C $R . && rm -rf $R
