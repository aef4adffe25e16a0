#!/usr/bin/env bash
# Session 16: the paper-scale pretraining through the pipeline on 2 GPUs (`trainer=ddp`, one nvidia-h200-x2 call):
# `experiment=paper_scale stage=pretrain` = simulate 9.18M sessions, streaming prep, one epoch of packed BERT-base MLM
# over the 6.82M training sessions, against one H200's 512.3 s of fit time / 752k real tokens/s
# (results/paper_scale_gpu_s16.md). SIGTERM after $LIMIT s (a checkpoint; the log says the step reached); the
# call's log is copied to $OUT every 10 s, so a call cut by the device's limit still returns it.
source experiments/device/ddp_env.sh
nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit --format=csv > $R/gpus.txt 2>&1
( while sleep 10; do cp outputs/paper_scale/call-*.log $R/ 2>/dev/null; done ) &
copier=$!
EXTRA="trainer=ddp trainer.devices=2" STAGE=pretrain LIMIT=${LIMIT:-480} bash experiments/device/paper_scale.sh
kill $copier 2>/dev/null
cp outputs/paper_scale/call-*.log $R/ 2>/dev/null
cp outputs/paper_scale/call-1/train_ddp_process_1.log $R/ 2>/dev/null
ls outputs/paper_scale/call-1/ 2>/dev/null
