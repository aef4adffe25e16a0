#!/usr/bin/env bash
# One H200 call (~5 min), session 10: the Triton attention for short sessions (pretrain.fused_attention). Correctness against
# fp32 (attention_check.py: kernel alone, sessions up to 128 and 512; fused_norm_check.py: the packed encoder with
# every variant); attention alone against torch's varlen FlashAttention (bench_attention.py, seq 128 / 512 / 64);
# packed MLM throughput of the shipped GPU variant (every fused switch) with and without it, beside the HF reference,
# seq 128 and 512 (same-call A/B); with PROFILE=1 a profile of the step with everything on, seq 128.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
# at most 8 files come back: everything goes to $R, packed into one tarball at the end (and the two tables beside it)
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
python3 experiments/device/attention_check.py > $R/attention_check.json 2>$R/attention_check.err; cat $R/attention_check.json; tail -3 $R/attention_check.err
for s in 128 512; do
  python3 experiments/bench_attention.py --lengths .bench/lengths_sim.npy --seq-len $s --variants varlen,triton,triton-db \
    --out $R/bench_attention_seq${s}_triton.json 2>&1 | cut -c1-400
done
# (fused_norm_check.py, the packed encoder with every variant against fp32: calls 1 and 2)

python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py --only-packed \
  --fused-qkv only --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention also \
  --seq-lens 128 512 --out $R/bench_gpu_attention.json --md $R/bench_gpu_attention.md 2>&1 | grep -E '^\||Error' | cut -c1-300
[ -n "$PROFILE" ] && python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only --seq-lens 128 --steps 12 \
  --profile-dir $R/profiles --out $R/profile_run.json 2>&1 | grep -E '^\||Error' | cut -c1-300
cp $R/bench_gpu_attention.md $R/attention_check.json $OUT/ 2>/dev/null; tar czf $OUT/results.tgz -C $R . && rm -rf $R
