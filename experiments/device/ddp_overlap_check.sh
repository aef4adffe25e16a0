#!/usr/bin/env bash
# One nvidia-h200-x2 call (~5 min), session 15: where DDP's ~15% per step on the packed path goes
# (notes_speed.md, session 14: likely NCCL's all-reduce kernels running beside the backward). Needs .bench carried
# (lengths_sim.npy, site/). Results: $OUT/results.tgz (rewritten after each part).
# 0. the reference in this call: 1 GPU and 2 GPUs, default DDP, with SM clocks and power sampled every 200 ms;
# 1. one bucket, all-reduced after the backward (no overlap); 2. NCCL on 4 channels (fewer SMs beside the backward);
# 3. a profiler table per rank, one GPU and two (which kernels got slower).
source experiments/device/ddp_env.sh  # $R, $sw, show, NVLink multicast off
nvidia-smi topo -m > $R/topo.txt 2>&1
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv -lms 200 > $R/smi.csv 2>&1 &
SMI=$!
python3 experiments/bench_ddp.py $sw --devices 1,2 --out $R/base.json > $R/base.log 2>&1
show $R/base.json; kill $SMI; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 2 --ddp-kwargs bucket_cap_mb=1000 --out $R/one_bucket.json > $R/a.log 2>&1
show $R/one_bucket.json; tar czf $OUT/results.tgz -C $R .
NCCL_MAX_NCHANNELS=4 python3 experiments/bench_ddp.py $sw --devices 2 --out $R/nch4.json > $R/b.log 2>&1
show $R/nch4.json; tar czf $OUT/results.tgz -C $R .
python3 experiments/bench_ddp.py $sw --devices 1,2 --steps 10 --profile-dir $R/prof --out $R/prof.json > $R/c.log 2>&1
ls $R/prof; grep -h -i "error\|Traceback" $R/*.log | head -5
tar czf $OUT/results.tgz -C $R . && rm -rf $R
