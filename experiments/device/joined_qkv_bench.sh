#!/usr/bin/env bash
# One H200 call (~5 min), session 11: dq, dk, dv written by the attention backward into one (N, 3H) buffer, so that
# branch_in's backward runs one input-gradient and one weight-gradient GEMM for Q / K / V instead of three each
# (notes_speed.md #45). The step: the previous commit (.bench/old_s11, a `git archive` of sessionbert/, conf/ and the
# two benchmarks) and this tree, every switch on, one after the other in this call, this tree beside the HF
# reference, seq 128 and 512; then the packed encoder with every kernel against fp32 (fused_norm_check.py).
export PYTHONPATH=$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
OLD=.bench/old_s11 step_ab prev joined
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
python3 -c "import json; d=json.load(open('$R/fused_check.json')); print({k: (v['loss'], round(v['grad_rel_norm_median'], 5), round(v['grad_rel_norm_max'], 5)) for k, v in d.items() if isinstance(v, dict) and 'loss' in v})"
tar czf $OUT/results.tgz -C $R . && rm -rf $R
