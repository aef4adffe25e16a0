#!/usr/bin/env bash
# One nvidia-h200-x2 call (~2 min), session 15: the pipeline end to end under trainer=ddp on two GPUs with its new
# default DDP options (one gradient bucket, conf/trainer/ddp.yaml). Needs .bench carried (site/).
source experiments/device/ddp_env.sh  # $R, $sw, show, NVLink multicast off
python3 train.py experiment=smoke trainer=ddp trainer.devices=2 pretrain.packed=true pretrain.max_tokens=65536 \
  hydra.run.dir=$R/ddp_smoke paths.cache_dir=/tmp/ddp_cache > $R/ddp_smoke.log 2>&1
echo "ddp smoke rc=$?"; grep -i "bucket_cap\|mlm_loss\|error\|Traceback\|stage" $R/ddp_smoke.log | tail -8 | cut -c1-200
python3 -c "import yaml; print(yaml.safe_load(open('$R/ddp_smoke/.hydra/config.yaml'))['trainer']['ddp_kwargs'])"
tar czf $OUT/results.tgz -C $R . && rm -rf $R
