#!/usr/bin/env bash
# One nvidia-h200-x2 call (~7 min), session 15: goal 3 with no epoch boundary inside the timed steps (bench_ddp.py's
# default now tiles the ~24k lengths; its doc says why), beside the old untiled measurement in the same call.
# Needs .bench carried (lengths_sim.npy, site/). Results: $OUT/results.tgz (rewritten after each part).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=$OUT/r; mkdir -p $R
sw="--lengths .bench/lengths_sim.npy --packed --fused-qkv --fused-norm --fused-gelu --fused-residual --fused-ce --fused-attention"
show() { python3 -c "
import json
for r in json.load(open('$1'))['runs']:
    print('$1'.split('/')[-1], r['devices'], r.get('ddp_kwargs'), r['tokens_per_step_per_gpu'], 'tiles', r.get('tiles'), 'epochs', r.get('epochs_timed'), round(r['real_tokens_per_s']), round(1000 * r['seconds'] / r['steps'], 1), 'ms/step')"; }
python3 experiments/bench_ddp.py $sw --devices 1,2 --out $R/tiled.json > $R/tiled.log 2>&1
show $R/tiled.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 1,2 --no-tile --out $R/untiled.json > $R/untiled.log 2>&1
show $R/untiled.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 1,2 --tokens-per-step 262144 --out $R/tiled_262k.json > $R/tiled_262k.log 2>&1
show $R/tiled_262k.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 2 --ddp-kwargs bucket_cap_mb=1000 --out $R/tiled_one_bucket.json > $R/ob.log 2>&1
show $R/tiled_one_bucket.json; grep -h -i "error\|Traceback" $R/*.log | head -5
tar czf $OUT/results.tgz -C $R . && rm -rf $R
