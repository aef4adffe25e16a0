#!/usr/bin/env bash
# One H200 call (~4 min), session 11, after the PREFETCH loops in the row-wise kernels and the attention backward's
# pipelining depth: (1) the packed encoder with every kernel against fp32 (fused_norm_check.py); (2) the pipeline
# through Lightning with trainer=gpu's switches, BERT-base on the simulator's default size (2 packed epochs); (3) a
# profile of the step with every switch at seq 128 (where the time goes now).
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err; cut -c1-2500 $R/fused_check.json
python3 train.py experiment=smoke trainer=gpu data.size=default model.arch=base pretrain.epochs=2 pretrain.packed=true \
  pretrain.max_tokens=65536 hydra.run.dir=$R/smoke paths.cache_dir=/tmp/s11_smoke_cache > $R/smoke.log 2>&1
echo "smoke rc=$?"
grep -v -i "warning" $R/smoke.log | grep -i "stage \|error\|Traceback" | tail -12 | cut -c1-200
python3 -c "import json; m=json.load(open('$R/smoke/metrics.json')); print(json.dumps({k: m[k] for k in m if k in ('pretrain','finetune','recommend')})[:1200])"
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only --fused-norm only \
  --fused-gelu only --fused-residual only --fused-ce only --fused-attention only --seq-lens 128 --steps 12 \
  --profile-dir $R/profiles --out $R/profile_run.json 2>&1 | grep -E '^\||Error' | cut -c1-300
rm -rf $R/smoke/checkpoints $R/smoke/*/checkpoints 2>/dev/null
tar czf $OUT/results.tgz -C $R . && rm -rf $R
