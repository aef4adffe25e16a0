#!/usr/bin/env bash
# One device call (one H200): `sessionbert recommend` on 1M users' last 8 sessions (issue 7), then fine-tuning
# time vs seq_len on the padded and the length-bucketed paths (issue 6 goal 2). Results under $OUT.
# Needs .whl/site (hydra, omegaconf, antlr4, hydra_plugins) carried; torch/lightning/transformers are on the machine.
set -x
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/device.txt
python3 -c "import torch, lightning, transformers, pyarrow, tokenizers; print(torch.__version__, lightning.__version__, transformers.__version__, pyarrow.__version__, tokenizers.__version__)" | tee -a $OUT/device.txt
nproc | tee -a $OUT/device.txt
timeout ${INF_LIMIT:-330} python3 experiments/bench_inference.py --device cuda --users ${INF_USERS:-1000000} \
  --base-users 10000 --compare-users 50000 --train-args "trainer=gpu" --work /tmp/binf \
  --out $OUT/bench_inference_gpu.txt 2>&1 | grep -v Warning | tail -15
timeout ${FT_LIMIT:-230} python3 experiments/bench_finetune.py --device cuda --out $OUT/bench_finetune_gpu.json \
  --md $OUT/bench_finetune_gpu.md 2>&1 | grep -v Warning | tail -30
