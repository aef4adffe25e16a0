#!/usr/bin/env bash
# One H200 call (382 s with part 3), session 12, most important first (the session's device time may cut the end;
# results.tgz is rewritten after each part):
# 1. the embeddings as one Triton kernel each way (models.fused_embed, on with pretrain.fused_norm; notes_speed.md
#    #46): the step with the previous commit (.bench/old_s12, a `git archive` of 52e8bf1's sessionbert/, conf/ and the
#    two benchmarks) and with this tree, every switch on, one after the other in this call, this tree beside the HF
#    reference, seq 128 (step_ab.sh);
# 2. the packed encoder with every kernel against fp32 (fused_norm_check.py: the embeddings kernel included);
# 3. (ran at commit e6df2c4, removed since with the switch it measured: notes_speed.md #47) scoring through the fused
#    forward kernels, `python3 experiments/bench_inference.py --device cuda --users 50000 --base-users 5000
#    --no-padded --packed --fused --work /tmp/binf --out $R/bench_inference_fused_gpu.txt --train-args "trainer=gpu
#    model.arch=base trainer.limit_train_batches=3 trainer.limit_val_batches=2"`;
# 4. the kernels alone (bench_fused_norm.py, its `embed` group: HF BertEmbeddings against fused_embed.embed).
export PYTHONPATH=$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
SEQS=128 OLD=.bench/old_s12 step_ab prev embed
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
python3 -c "import json; d=json.load(open('$R/fused_check.json')); print({k: (v['loss'], round(v['grad_rel_norm_median'], 5), round(v['grad_rel_norm_max'], 5)) for k, v in d.items() if isinstance(v, dict) and 'loss' in v})"
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/bench_fused_norm.py --out $R/bench_fused_norm.json 2>&1 \
  | grep -E '"embed"|Error' | cut -c1-300
tar czf $OUT/results.tgz -C $R . && rm -rf $R
