#!/usr/bin/env bash
# One device call (one H200, ~4 min) for the opt-in speed paths shipped without a GPU measurement, run before the
# paper-scale re-run so that it uses whichever is faster:
#  1. pretrain.fused_qkv: the packed path with and without one Q/K/V GEMM at seq 64 (the paper-scale seq_len) and
#     128, beside the HF reference in the same call (issue 6 goal 1);
#  2. packed scoring: `sessionbert recommend` padded vs --packed on 100k users' last 8 sessions, BERT-base shape
#     (the paper-scale run's score_all stage: 302 s for 680k users padded).
# Needs .whl/site and .bench (hf_peer_mlm.py, lengths_sim.npy) carried. Results under $OUT.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/device.txt
timeout 200 python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py \
  --only-packed --fused-qkv --seq-lens 64 128 --steps 30 --out $OUT/bench_gpu_fusedqkv.json \
  --md $OUT/bench_gpu_fusedqkv.md 2>&1 | grep -v Warning | tail -14
timeout 220 python3 experiments/bench_inference.py --device cuda --users 100000 --base-users 10000 --packed \
  --train-args "trainer=gpu model.arch=base trainer.limit_train_batches=3 trainer.limit_val_batches=2" \
  --work /tmp/binfb --out $OUT/bench_inference_packed_gpu.txt 2>&1 | grep -v Warning | tail -6
