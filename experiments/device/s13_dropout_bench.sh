#!/usr/bin/env bash
# One H200 call, session 13 (notes_speed.md #52): dropout masks from eight 16-bit draws per Philox call. Needs .bench
# carried: lengths_sim.npy, old_s13c (a `git archive` of the commit before), site/ (hydra, omegaconf, antlr4).
# 1. the step with every switch at seq 128, after a warm-up process, interleaved: this tree, the previous, this, the
#    previous (the first process of a call runs slow: #51);
# 2. the LayerNorm and embeddings kernels alone, previous tree then this one (bench_fused_norm.py --groups norm,embed);
# 3. the packed encoder with every kernel against fp32, and the dropout path's drop share (fused_norm_check.py).
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
sw="--only-packed --fused-qkv only --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only --no-peer --seq-lens 128"
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy $sw --steps 20 --out /tmp/warm.json > /dev/null 2>&1
for i in 1 2; do
  python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy $sw --out $R/new_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-200
  (cd .bench/old_s13c && python3 experiments/bench_gpu.py --lengths ../lengths_sim.npy $sw --out $R/prev_$i.json 2>&1 \
    | grep -E '^\| ours|Error' | cut -c1-200)
done
tar czf $OUT/results.tgz -C $R .
(cd .bench/old_s13c && python3 experiments/bench_fused_norm.py --groups norm,embed --out $R/bench_norm_prev.json 2>&1 | cut -c1-250)
python3 experiments/bench_fused_norm.py --groups norm,embed --out $R/bench_norm.json 2>&1 | cut -c1-250
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
python3 -c "import json; d=json.load(open('$R/fused_check.json')); print({k: v for k, v in d.items() if 'drop' in k}); print({k: (v['loss'], round(v['grad_rel_norm_median'], 5), round(v['grad_rel_norm_max'], 5)) for k, v in d.items() if isinstance(v, dict) and 'loss' in v})"
tar czf $OUT/results.tgz -C $R . && rm -rf $R
