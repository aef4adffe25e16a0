#!/usr/bin/env bash
# The seq_len-64 part of `make ablations SCALE=cpu` on a 16-core host, CPU only (trainer=cpu), 2 threads per job,
# all grids at once through the joblib launcher (one shared cache): sessionbert vs bert_base, the rankers with
# seeds 0,1,2, the vocab grid, seq_len 128. Each grid is cut at LIMIT seconds; the report covers what finished.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=""
D=/tmp/ablations_cpu; LIMIT=${LIMIT:-270}
ABL="timeout $LIMIT python3 train.py -m experiment=ablations_cpu trainer=cpu logger=csv hydra/launcher=joblib paths.cache_dir=/tmp/abl_cache"
t0=$(date +%s)
run() { local name=$1; shift; ( $ABL "$@" hydra.sweep.dir=$D/$name > $OUT/$name.log 2>&1; echo "$name exit $? after $(( $(date +%s) - t0 )) s" >> $OUT/timing.txt ) & }
run model_x_seq_len hydra.launcher.n_jobs=2 model=sessionbert,bert_base seq_len=64
run rankers hydra.launcher.n_jobs=3 recommend.ranker=count,prob,persona seed=0,1,2
run vocab_size hydra.launcher.n_jobs=3 vocab_size=250,500,1000
run seq_len hydra.launcher.n_jobs=1 seq_len=128
wait
python3 -m sessionbert.report $D --out /tmp/abl_report
cp /tmp/abl_report/report.md /tmp/abl_report/results.csv $OUT/
(cd $D && find . -name metrics.json -o -name overrides.yaml -o -name job_status.json | tar czf $OUT/runs.tgz -T -)
(cd $OUT && tar czf logs.tgz *.log && rm *.log)
cat $OUT/timing.txt
