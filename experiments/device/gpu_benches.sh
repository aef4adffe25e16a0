#!/usr/bin/env bash
# One device call (one H200 x2 host): DDP scaling, GPU clustering, GPU inference throughput. Results under $OUT.
# Needs .bench (lengths_sim.npy) and .whl/site (hydra, omegaconf, antlr4, hydra_plugins copied from a local install)
# carried; torch/lightning/transformers are on the machine.
set -x
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/device.txt
python3 -c "import torch, lightning, transformers; print(torch.__version__, lightning.__version__, transformers.__version__)" | tee -a $OUT/device.txt
python3 experiments/bench_ddp.py --lengths .bench/lengths_sim.npy --devices 1,2 --seq 128 --steps 60 --warmup 10 \
  --out $OUT/bench_ddp.json 2>&1 | grep -v Warning | tail -40
python3 experiments/bench_cluster_gpu.py --users 1000000 --dim 768 --device cuda --json $OUT/bench_cluster_gpu.json 2>&1 | tail -20
python3 experiments/bench_inference.py --device cuda --users 20000 --batch-users 5000 --train-args "trainer=gpu" \
  --work /tmp/binf --out $OUT/bench_inference_gpu.txt 2>&1 | tail -5
