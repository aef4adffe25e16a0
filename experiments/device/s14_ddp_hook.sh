#!/usr/bin/env bash
# One nvidia-h200-x2 call, session 14, after s14_ddp_diag.sh (the 23 ms per step are the two-GPU exchange, not DDP's
# wrapper): (a) two GPUs with NCCL_DEBUG=INFO (which transport NCCL picked) and gradients all-reduced in bf16 (torch's
# bf16_compress_hook: half the bytes). Needs .bench (lengths, site/).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
sw="--lengths .bench/lengths_sim.npy --packed --fused-qkv --fused-norm --fused-gelu --fused-residual --fused-ce --fused-attention"
NCCL_DEBUG=INFO python3 experiments/bench_ddp.py $sw --devices 2 --comm-hook bf16 --out $R/ddp2_bf16hook.json > $R/d.log 2>&1
python3 -c "import json; r=json.load(open('$R/ddp2_bf16hook.json'))['runs'][0]; print(r['comm_hook'], round(r['real_tokens_per_s']), round(r['seconds'],2))"
grep -E "NCCL INFO (Channel|.*via|P2P|SHM|Using network|NET/)" $R/d.log | sort | uniq -c | sort -rn | head -12 | cut -c1-200
grep -h -i "error\|Traceback" $R/d.log | head -5
tar czf $OUT/results.tgz -C $R . && rm -rf $R
