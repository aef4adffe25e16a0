#!/usr/bin/env bash
# The next device call (one H200, ~2 min): attention kernels for the packed step at seq 128 and 64
# (experiments/notes_speed.md, "Next lever for goal 1"). Earlier contents of this script (fused QKV A/B, packed vs
# padded scoring) ran on 2026-11-29: results/bench_gpu_fusedqkv.md, results/bench_inference_packed_gpu.txt.
# On the 2-GPU kind, also: python3 experiments/bench_ddp.py --lengths .bench/lengths_sim.npy --devices 1,2 --packed
# Needs .whl/site and .bench (lengths_sim.npy) carried. Results under $OUT.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/device.txt
for s in 128 64; do
  timeout 150 python3 experiments/bench_attention.py --lengths .bench/lengths_sim.npy --seq-len $s \
    --out $OUT/bench_attention_seq$s.json 2>&1 | grep -v Warning | tail -6
done
