#!/usr/bin/env bash
# One H200 call (~5 min), session 12: the embeddings as one Triton kernel each way (models.fused_embed, on with
# pretrain.fused_norm; notes_speed.md #46). The step: the previous commit (.bench/old_s12, a `git archive` of
# 52e8bf1's sessionbert/, conf/ and the two benchmarks) and this tree, every switch on, one after the other in this
# call, this tree beside the HF reference, seq 128 and 512 (step_ab.sh); then the kernels alone (bench_fused_norm.py,
# its `embed` group: HF BertEmbeddings against fused_embed.embed) and the packed encoder with every kernel against
# fp32 (fused_norm_check.py).
export PYTHONPATH=$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
OLD=.bench/old_s12 step_ab prev embed
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/bench_fused_norm.py --out $R/bench_fused_norm.json 2>&1 \
  | grep -E '"embed"|Error' | cut -c1-300
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
python3 -c "import json; d=json.load(open('$R/fused_check.json')); print({k: (v['loss'], round(v['grad_rel_norm_median'], 5), round(v['grad_rel_norm_max'], 5)) for k, v in d.items() if isinstance(v, dict) and 'loss' in v})"
tar czf $OUT/results.tgz -C $R . && rm -rf $R
