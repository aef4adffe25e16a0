#!/usr/bin/env bash
# One H200 call (~2 min), session 8: the whole pipeline through Lightning on a GPU with the packed path and every
# fused kernel on (fused QKV, fused norm with the dense bias, fused GELU), BERT-base, bf16-mixed, on the simulator's
# default size (1,800 users): the first run of pretrain.fused_gelu inside Lightning on a GPU (the paper-scale run
# predates it). metrics.json and report.md under $OUT/smoke.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
python3 train.py experiment=smoke trainer=gpu data.size=default model.arch=base pretrain.epochs=2 \
  pretrain.packed=true pretrain.max_tokens=65536 pretrain.fused_qkv=true pretrain.fused_norm=true \
  pretrain.fused_gelu=true hydra.run.dir=$OUT/smoke paths.cache_dir=/tmp/fused_smoke_cache > $OUT/smoke.log 2>&1
echo "rc=$?"
grep -v -i "warning" $OUT/smoke.log | grep -i "stage \|error\|Traceback\|metrics:" | tail -12 | cut -c1-200
python3 -c "import json; m=json.load(open('$OUT/smoke/metrics.json')); print(json.dumps({k: m[k] for k in m if k in ('pretrain','finetune','recommend','personas')})[:1500])"
