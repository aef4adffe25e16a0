#!/usr/bin/env bash
# One nvidia-h200-x2 call, session 14: issue 6 goal 3 on the packed path with every fused kernel (item 1 of
# next_gpu_checks.sh), then the pipeline end to end under DDP on two GPUs. Needs .bench carried (lengths_sim.npy, site/).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
nvidia-smi topo -m > $R/topo.txt 2>&1
python3 experiments/bench_ddp.py --lengths .bench/lengths_sim.npy --devices 1,2 --packed --fused-qkv --fused-norm \
  --fused-gelu --fused-residual --fused-ce --fused-attention --out $R/bench_ddp_packed.json > $R/bench_ddp.log 2>&1
echo "bench_ddp rc=$?"; grep -v -i warn $R/bench_ddp.log | tail -8 | cut -c1-300
tar czf $OUT/results.tgz -C $R .
python3 train.py experiment=smoke trainer=ddp trainer.devices=2 pretrain.packed=true pretrain.max_tokens=65536 \
  hydra.run.dir=$R/ddp_smoke paths.cache_dir=/tmp/ddp_cache > $R/ddp_smoke.log 2>&1
echo "ddp smoke rc=$?"; grep -i "mlm_loss\|error\|Traceback\|stage" $R/ddp_smoke.log | tail -6 | cut -c1-200
tar czf $OUT/results.tgz -C $R . && rm -rf $R
