#!/usr/bin/env bash
# One nvidia-h200-x2 call, session 14, after s14_ddp.sh measured 1.74x on the packed path (148 -> 171 ms per step):
# where do the 23 ms per step go? (a) one GPU under DDP (the wrapper without communication), (b) two GPUs with
# static_graph + gradient_as_bucket_view, (c) two GPUs as before (run-to-run spread). Needs .bench (lengths, site/).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
sw="--lengths .bench/lengths_sim.npy --packed --fused-qkv --fused-norm --fused-gelu --fused-residual --fused-ce --fused-attention"
python3 experiments/bench_ddp.py $sw --devices 1 --ddp-on-one --out $R/ddp_on_one.json > $R/a.log 2>&1
tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 2 --ddp-kwargs static_graph=true,gradient_as_bucket_view=true \
  --out $R/ddp2_static.json > $R/b.log 2>&1
tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 2 --out $R/ddp2_again.json > $R/c.log 2>&1
for f in $R/*.json; do python3 -c "import json,sys; r=json.load(open('$f'))['runs'][0]; print('$f'.split('/')[-1], r['devices'], r['strategy'], r['ddp_kwargs'], round(r['real_tokens_per_s']), round(r['seconds'],2))"; done
grep -h -i "error\|Traceback" $R/*.log | head -5
tar czf $OUT/results.tgz -C $R . && rm -rf $R
