#!/usr/bin/env bash
# One nvidia-h200-x2 call (~6 min), session 15: goal 3's candidates interleaved (tiled lengths, 131k slots per GPU):
# one GPU, two GPUs with DDP's default buckets (25 MB), one bucket (bucket_cap_mb=1000: the all-reduce after the
# backward, no overlap), 100 MB buckets; then the same again in the other order.
# Needs .bench carried (lengths_sim.npy, site/). Results: $OUT/results.tgz (rewritten after each part).
source experiments/device/ddp_env.sh  # $R, $sw, show, NVLink multicast off
one() { python3 experiments/bench_ddp.py $sw --out $R/$1.json "${@:2}" > $R/$1.log 2>&1; show $R/$1.json; tar czf $OUT/results.tgz -C $R .; }
one g1_a --devices 1
one g2_default_a --devices 2
one g2_onebucket_a --devices 2 --ddp-kwargs bucket_cap_mb=1000
one g2_100mb_a --devices 2 --ddp-kwargs bucket_cap_mb=100
one g2_onebucket_b --devices 2 --ddp-kwargs bucket_cap_mb=1000
one g2_default_b --devices 2
one g1_b --devices 1
grep -h -i "error\|Traceback" $R/*.log | head -5
tar czf $OUT/results.tgz -C $R . && rm -rf $R
