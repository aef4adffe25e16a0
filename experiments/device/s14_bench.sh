#!/usr/bin/env bash
# One H200 call, session 14 (notes_speed.md #53): the packed path's last layer past its attention on the masked rows
# only (`packed_hidden(rows=...)`). Needs .bench carried: lengths_sim.npy, hf_peer_mlm.py, old_s14 (a `git archive` of
# d265422, the commit before), site/ (hydra, omegaconf, antlr4). Most important first (results.tgz rewritten after
# each part):
# 1. the step with every switch: a warm-up process, the previous commit, then this tree beside the HF reference, then
#    both again (ROUNDS=2), seq 128 and 512 (step_ab.sh);
# 2. the packed encoder with every kernel against fp32, with and without rows (fused_norm_check.py);
# 3. the pipeline through Lightning on the GPU, packed, every fused switch (tiny data).
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
SEQS="${SEQS:-128 512}" ROUNDS=${ROUNDS:-2} OLD=.bench/old_s14 step_ab prev rows
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
python3 -c "import json; d=json.load(open('$R/fused_check.json')); print({k: (v['loss'], round(v['hidden_max_rel'], 4), round(v['grad_rel_norm_median'], 5), round(v['grad_rel_norm_max'], 5)) for k, v in d.items() if isinstance(v, dict) and 'loss' in v})"
tail -2 $R/fused_check.err | cut -c1-300
tar czf $OUT/results.tgz -C $R .
# 3. the pipeline through Lightning on the GPU (trainer=gpu: bf16-mixed, every fused switch), packed, tiny data
PYTHONPATH=$PWD:$PWD/.bench/site python3 train.py experiment=smoke trainer=gpu pretrain.packed=true \
  pretrain.max_tokens=65536 hydra.run.dir=$R/smoke paths.cache_dir=/tmp/s14_cache > $R/smoke.log 2>&1
echo "smoke rc=$?"
grep -i "mlm_loss\|error\|Traceback" $R/smoke.log | tail -4 | cut -c1-200
tar czf $OUT/results.tgz -C $R . && rm -rf $R
