#!/usr/bin/env bash
# The next device calls (experiments/notes_speed.md, sessions 7-13). Earlier contents of this script ran on 2026-11-29:
# fused QKV A/B and packed vs padded scoring (results/bench_gpu_fusedqkv.md, bench_inference_packed_gpu.txt), the
# attention kernels (results/bench_attention_seq*_{sdpa,njt_flex}.json), the fused LayerNorm kernels alone and in the
# step (session 8: fused_kernels_*.sh, results/fused_kernels_dev/), and the paper scale with every fused switch
# (session 9: results/paper_scale_gpu_s9.md). Session 10's attention kernels: attention_bench.sh. Session 11:
# prefetch_bench.sh, attention_stages.sh, final_checks_s11.sh, joined_qkv_bench.sh (a same-call A/B against a
# `git archive` of the previous commit under .bench/: step_ab.sh). Session 12: paper_scale.sh, embed_infer_bench.sh.
# Session 13: s13_bench.sh, fp8_bench.py, s13_gelu_bench.sh, s13_dropout_bench.sh.
# 0. (ran in session 12: results/paper_scale_gpu_s12.md) experiment=paper_scale with the kernels of sessions 10-11; the
#    embeddings kernel of session 12 (models.fused_embed) and session 13's kernel changes (#48-#52: short
#    attention-backward programs, +1.9% at seq 64, the paper scale's; GELU through erfc's fit; 16-bit dropout draws)
#    are not yet run at paper scale (~19 min in three chained calls, a whole session's
#    device budget): LIMIT=560 STAGE=all bash experiments/device/paper_scale.sh, then again. (Session 12's missing
#    seq-512 A/B ran in session 13: results/bench_gpu_s13.md.)
# Needs .whl/site and .bench (lengths_sim.npy, hf_peer_mlm.py) carried. Results under $OUT.
#
# 1. On the 2-GPU kind (nvidia-h200-x2: not lent in sessions 6-11 and 13; listed at the end of session 12, too late), goal 3
#    on the packed path with today's kernels (~3 min):
#      python3 experiments/bench_ddp.py --lengths .bench/lengths_sim.npy --devices 1,2 --packed --fused-qkv \
#        --fused-norm --fused-gelu --fused-residual --fused-ce --fused-attention --out $OUT/bench_ddp_packed.json
#    and the pipeline end to end under DDP: python3 train.py experiment=smoke trainer=ddp trainer.devices=2 \
#        pretrain.packed=true pretrain.max_tokens=65536 pretrain.fused_qkv=true pretrain.fused_norm=true \
#        pretrain.fused_gelu=true pretrain.fused_residual=true pretrain.fused_ce=true pretrain.fused_attention=true \
#        hydra.run.dir=$OUT/ddp_smoke paths.cache_dir=/tmp/ddp_cache
# 2. On one H200, this script (~2 min): a torch.profiler table of the shipped step, seq 128, no reference (where the
#    step's GPU time goes after the next kernel change; the step is GPU-bound, notes_speed.md session 8).
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/device.txt
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only --seq-lens 128 \
  --profile-dir $OUT \
  --out $OUT/bench_gpu_profile.json 2>&1 | grep -E '^\||Error' | cut -c1-300
