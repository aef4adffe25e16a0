#!/usr/bin/env bash
# One H200 call (~5 min), session 11: the feed-forward block's bias + GELU in Triton GEMM epilogues (pretrain.fused_ffn).
# The block alone against the shipped bias + GELU kernels (bench_ffn.py: per layer, errors against fp32, the two GEMMs
# alone against cuBLAS, the autotuner's picks); the packed encoder with every variant against fp32
# (fused_norm_check.py); packed MLM throughput with every other switch on, with and without it, beside the HF
# reference, seq 128 and 512 (same-call A/B); with PROFILE=1 a profile of the step with everything on, seq 128.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
# at most 8 files come back: everything goes to $R, packed into one tarball at the end (and the table beside it)
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $R/device.txt
python3 experiments/bench_ffn.py --repeats 30 ${FFN_TOKENS:+--tokens $FFN_TOKENS} --out $R/bench_ffn.json 2>&1 | cut -c1-900
[ -z "$SKIP_CHECK" ] && python3 experiments/device/fused_norm_check.py > $R/fused_check.json 2>$R/fused_check.err
cat $R/fused_check.json 2>/dev/null | cut -c1-3000; tail -3 $R/fused_check.err 2>/dev/null
[ -z "$SKIP_STEP" ] && python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py \
  --only-packed --fused-qkv only --fused-norm only --fused-gelu only --fused-residual only --fused-ce only \
  --fused-attention only --fused-ffn also --seq-lens ${SEQS:-128 512} --out $R/bench_gpu_ffn.json --md $R/bench_gpu_ffn.md \
  2>&1 | grep -E '^\||Error' | cut -c1-300
[ -n "$PROFILE" ] && python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only --fused-ffn only \
  --seq-lens 128 --steps 12 --profile-dir $R/profiles --out $R/profile_run.json 2>&1 | grep -E '^\||Error' | cut -c1-300
cp $R/bench_gpu_ffn.md $OUT/ 2>/dev/null; tar czf $OUT/results.tgz -C $R . && rm -rf $R
