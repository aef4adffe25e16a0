#!/usr/bin/env bash
# The next device calls (experiments/notes_speed.md, sessions 7-13). Earlier contents of this script ran on 2026-11-29:
# fused QKV A/B and packed vs padded scoring (results/bench_gpu_fusedqkv.md, bench_inference_packed_gpu.txt), the
# attention kernels (results/bench_attention_seq*_{sdpa,njt_flex}.json), the fused LayerNorm kernels alone and in the
# step (session 8: fused_kernels_*.sh, results/fused_kernels_dev/), and the paper scale with every fused switch
# (session 9: results/paper_scale_gpu_s9.md). Session 10's attention kernels: attention_bench.sh. Session 11:
# prefetch_bench.sh, attention_stages.sh, final_checks_s11.sh, joined_qkv_bench.sh (a same-call A/B against a
# `git archive` of the previous commit under .bench/: step_ab.sh). Session 12: paper_scale.sh, embed_infer_bench.sh.
# Session 13: s13_bench.sh, fp8_bench.py, s13_gelu_bench.sh, s13_dropout_bench.sh. Session 14: s14_bench.sh,
# s14_profile.sh, s14_ddp.sh, s14_ddp_diag.sh, s14_ddp_hook.sh.
# 0. (ran in session 12: results/paper_scale_gpu_s12.md) experiment=paper_scale with the kernels of sessions 10-11; the
#    embeddings kernel of session 12 (models.fused_embed) and session 13's kernel changes (#48-#52: short
#    attention-backward programs, +1.9% at seq 64, the paper scale's; GELU through erfc's fit; 16-bit dropout draws)
#    and session 14's #53 (the last layer on the masked rows: +4.1% at seq 64) are not yet run at paper scale
#    (~19 min in three chained calls, a whole session's device budget): LIMIT=560 STAGE=all bash experiments/device/paper_scale.sh, then again. (Session 12's missing
#    seq-512 A/B ran in session 13: results/bench_gpu_s13.md.)
# Needs .whl/site and .bench (lengths_sim.npy, hf_peer_mlm.py) carried. Results under $OUT.
#
# 1. (ran in session 14: 1.74x, fused_kernels_dev/s14_call3_ddp/ .. s14_call7_two_solo/) goal 3 on the packed path.
#    Next, on nvidia-h200-x2 (~4 min, .bench carried, PYTHONPATH=$PWD:$PWD/.bench/site): where DDP's ~15% per step
#    goes (notes_speed.md, session 14: likely NCCL's kernels overlapping the backward). With
#    sw="--lengths .bench/lengths_sim.npy --packed --fused-qkv --fused-norm --fused-gelu --fused-residual \
#        --fused-ce --fused-attention":
#    (as experiments/device/ddp_overlap_check.sh:)
#      python3 experiments/bench_ddp.py $sw --devices 2 --ddp-kwargs bucket_cap_mb=1000 --out $OUT/one_bucket.json
#      NCCL_MAX_NCHANNELS=4 python3 experiments/bench_ddp.py $sw --devices 2 --out $OUT/nch4.json
#      python3 experiments/bench_ddp.py $sw --devices 1,2 --steps 10 --profile-dir $OUT/prof --out $OUT/prof.json
#    (one GPU ran 148.4 ms per step, two 170.8-171.6: bench_ddp's seconds / steps.)
# 2. On one H200, this script (~2 min): a torch.profiler table of the shipped step, seq 128, no reference (where the
#    step's GPU time goes after the next kernel change; the step is GPU-bound, notes_speed.md session 8).
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/device.txt
python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer --only-packed --fused-qkv only \
  --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only --seq-lens 128 \
  --profile-dir $OUT \
  --out $OUT/bench_gpu_profile.json 2>&1 | grep -E '^\||Error' | cut -c1-300
