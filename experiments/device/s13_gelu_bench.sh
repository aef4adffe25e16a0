#!/usr/bin/env bash
# One H200 call, session 13 (notes_speed.md #51): the GELU kernels with erfc's Chebyshev fit instead of libdevice's
# erf. Needs .bench carried: lengths_sim.npy, hf_peer_mlm.py, old_s13b (a `git archive` of 4318491, the commit before),
# site/ (hydra, omegaconf, antlr4). Most important first (results.tgz rewritten after each part):
# 1. the step with every switch, the previous commit then this tree beside the HF reference, seq 128 and 512
#    (step_ab.sh);
# 2. the kernels alone, previous tree then this one (bench_fused_norm.py --groups gelu,dense_gelu);
# 3. the packed encoder with every kernel against fp32 (fused_norm_check.py).
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
SEQS="${SEQS:-128 512}" OLD=.bench/old_s13b step_ab prev gelu
tar czf $OUT/results.tgz -C $R .
(cd .bench/old_s13b && python3 experiments/bench_fused_norm.py --groups gelu,dense_gelu --out $R/bench_gelu_prev.json \
  2>&1 | cut -c1-300)
python3 experiments/bench_fused_norm.py --groups gelu,dense_gelu --out $R/bench_gelu.json 2>&1 | cut -c1-300
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
python3 -c "import json; d=json.load(open('$R/fused_check.json')); print({k: (v['loss'], round(v['grad_rel_norm_median'], 5), round(v['grad_rel_norm_max'], 5)) for k, v in d.items() if isinstance(v, dict) and 'loss' in v})"
tail -2 $R/fused_check.err | cut -c1-300
tar czf $OUT/results.tgz -C $R . && rm -rf $R
