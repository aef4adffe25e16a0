#!/usr/bin/env bash
# One H200 call, session 16 (the last ~240 device-seconds): the last layer's attention with its queries on the masked
# rows only (`packed_hidden(rows=QueryRows(...))`, what MLMModule.packed_loss passes now; notes_speed.md, session 14
# leads: ~+0.7% predicted without the Q GEMM's share). (1) fused_norm_check.py: the packed encoder with every kernel
# and the query subset against fp32 on the GPU; (2) the step at seq 128, no reference: the commit before
# (.bench/old_s16, a `git archive d2492b9 sessionbert conf experiments/bench_gpu.py`) / this tree / before / this
# tree; results.tgz rewritten after each part. Needs .bench carried (lengths_sim.npy, old_s16, site/).
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/fused_norm_check.py > $R/fused_norm_check.json 2> $R/check.err
tail -3 $R/check.err; python3 -c "
import json; d = json.load(open('$R/fused_norm_check.json'))
for k in ('all_fused', 'all_fused_rows', 'all_fused_qrows'):
    print(k, {x: d[k][x] for x in ('loss', 'hidden_max_rel', 'grad_rel_norm_max', 'grads_missing')})"
tar czf $OUT/results.tgz -C $R .
source experiments/device/step_ab.sh
for i in 1 2; do OLD=.bench/old_s16 ab_pair before_$i qrows_$i; done
rm -rf $R
