#!/usr/bin/env bash
# One nvidia-h200-x2 call (~7 min), session 15: goal 3 with no epoch boundary inside the timed steps (bench_ddp.py's
# default now tiles the ~24k lengths; its doc says why), beside the old untiled measurement in the same call.
# Needs .bench carried (lengths_sim.npy, site/). Results: $OUT/results.tgz (rewritten after each part).
source experiments/device/ddp_env.sh  # $R, $sw, show, NVLink multicast off
python3 experiments/bench_ddp.py $sw --devices 1,2 --out $R/tiled.json > $R/tiled.log 2>&1
show $R/tiled.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 1,2 --no-tile --out $R/untiled.json > $R/untiled.log 2>&1
show $R/untiled.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 1,2 --tokens-per-step 262144 --out $R/tiled_262k.json > $R/tiled_262k.log 2>&1
show $R/tiled_262k.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 2 --ddp-kwargs bucket_cap_mb=1000 --out $R/tiled_one_bucket.json > $R/ob.log 2>&1
show $R/tiled_one_bucket.json; grep -h -i "error\|Traceback" $R/*.log | head -5
tar czf $OUT/results.tgz -C $R . && rm -rf $R
