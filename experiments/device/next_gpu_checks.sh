#!/usr/bin/env bash
# One device call (one H200, ~9 min) for the opt-in speed paths shipped on 2026-11-29 without a GPU measurement:
#  1. pretrain.fused_qkv: the packed path with and without one Q/K/V GEMM, beside the HF reference in the same call
#     (issue 6 goal 1);
#  2. packed scoring: `sessionbert recommend` padded vs --packed on 300k users' last 8 sessions, BERT-base shape
#     (the paper-scale run's score_all stage: 302 s for 680k users padded).
# Needs .whl/site and .bench (hf_peer_mlm.py, lengths_sim.npy) carried. Results under $OUT.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
timeout 300 python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py \
  --only-packed --fused-qkv --seq-lens 128 512 --out $OUT/bench_gpu_fusedqkv.json --md $OUT/bench_gpu_fusedqkv.md \
  2>&1 | grep -v Warning | tail -12
timeout 250 python3 experiments/bench_inference.py --device cuda --users 300000 --base-users 10000 --packed \
  --train-args "trainer=gpu model.arch=base trainer.limit_train_batches=3 trainer.limit_val_batches=2" \
  --work /tmp/binfb --out $OUT/bench_inference_packed_gpu.txt 2>&1 | grep -v Warning | tail -6
