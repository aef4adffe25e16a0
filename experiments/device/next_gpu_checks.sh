#!/usr/bin/env bash
# The next device calls (experiments/notes_speed.md, session 7). Earlier contents of this script ran on 2026-11-29:
# fused QKV A/B and packed vs padded scoring (results/bench_gpu_fusedqkv.md, bench_inference_packed_gpu.txt), then the
# attention kernels (results/bench_attention_seq*_{sdpa,njt_flex}.json).
# Needs .whl/site and .bench (lengths_sim.npy, hf_peer_mlm.py) carried. Results under $OUT.
#
# 1. On the 2-GPU kind (nvidia-h200-x2), goal 3 on the packed path with today's kernels (~3 min):
#      python3 experiments/bench_ddp.py --lengths .bench/lengths_sim.npy --devices 1,2 --packed --fused-qkv \
#        --fused-norm --out $OUT/bench_ddp_packed.json
#    and the pipeline end to end under DDP: python3 train.py experiment=smoke trainer=ddp trainer.devices=2 \
#        pretrain.packed=true pretrain.max_tokens=65536 pretrain.fused_norm=true hydra.run.dir=$OUT/ddp_smoke \
#        paths.cache_dir=/tmp/ddp_cache
# 2. On one H200: the paper scale again with pretrain.fused_norm (on in experiment=paper_scale since session 7):
#      bash experiments/device/paper_scale.sh   (3 chained calls)
# 3. On one H200, this script (~1 min): the fused LayerNorm kernels alone and in the step, to tune the backward.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/device.txt
python3 experiments/bench_fused_norm.py --out $OUT/bench_fused_norm.json 2>&1 | grep '^{' | cut -c1-300
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm also --seq-lens 128 --profile-dir $OUT --out $OUT/bench_gpu_fused_norm.json 2>&1 | grep -E '^\{|Error' \
  | cut -c1-600
