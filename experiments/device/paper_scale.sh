#!/usr/bin/env bash
# Paper scale (issue 6, goal 4) on one H200 as a chain of device calls of at most 10 minutes each:
#   python train.py experiment=paper_scale resume=auto stage=$STAGE, sent SIGTERM after $LIMIT seconds
# A SIGTERM while pretraining or fine-tuning writes preempted.ckpt and the next call continues from it; finished
# stages come from the cache (.cache/sessionbert, kept on the machine while it is warm). Every call appends its
# wall time to outputs/paper_scale/calls.jsonl.
# Needs .bench/site or .whl/site (hydra, omegaconf, antlr4) carried; torch/lightning/transformers are on the machine.
#   LIMIT=560 STAGE=all       bash experiments/device/paper_scale.sh   # call 1: simulate, prep, pretraining (cut)
#   LIMIT=560 STAGE=recommend bash experiments/device/paper_scale.sh   # call 2: rest of pretraining, finetune,
#                                                                      #   personas, recommend (one sample Corpus)
#   LIMIT=560 STAGE=all       bash experiments/device/paper_scale.sh   # call 3: score_all (every user), report
# A device call returns at most ~8 files: $OUT gets calls.jsonl, device.txt, every call's log and the latest call's
# metrics.json / report.md.
export PYTHONPATH=$PWD:$PWD/.bench/site:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
mkdir -p outputs/paper_scale
if [ ! -f outputs/paper_scale/device.txt ]; then
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2;
    python3 -c "import torch, lightning, transformers, pyarrow, tokenizers, sklearn; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'tokenizers', tokenizers.__version__, 'sklearn', sklearn.__version__)"; } \
    > outputs/paper_scale/device.txt 2>&1
fi
n=$(ls -d outputs/paper_scale/call-*/ 2>/dev/null | wc -l)
dir=outputs/paper_scale/call-$((n + 1))
t0=$(date +%s.%N)
# SIGTERM to the main process only (GNU timeout signals the whole process group, which kills the data-loader
# workers before Lightning can write its checkpoint)
python3 train.py experiment=paper_scale logger=csv resume=auto stage=${STAGE:-all} hydra.run.dir=$dir $EXTRA \
  > $dir.log 2>&1 &
pid=$!
( sleep ${LIMIT:-560}; kill -TERM $pid 2>/dev/null ) >/dev/null 2>&1 &  # no pipe held open after the run
watchdog=$!
wait $pid
rc=$?
kill $watchdog 2>/dev/null
t1=$(date +%s.%N)
python3 - "$t0" "$t1" "$rc" "${STAGE:-all}" "$dir" <<'PY'
import json, sys
t0, t1, rc, stage, d = sys.argv[1:]
print(json.dumps({"call": d, "stage": stage, "rc": int(rc), "seconds": round(float(t1) - float(t0), 1)}),
      file=open("outputs/paper_scale/calls.jsonl", "a"))
PY
grep -v -i "warning\|litlogger\|│\|┃\|━\|─" $dir.log | grep -i "stage \|resum\|error\|preempt\|metrics:\|Traceback\|exception" | tail -40
tail -5 $dir.log
cat outputs/paper_scale/calls.jsonl
mkdir -p $OUT/paper_scale && cp outputs/paper_scale/calls.jsonl outputs/paper_scale/device.txt \
  outputs/paper_scale/call-*.log $OUT/paper_scale/ 2>/dev/null
cp $dir/metrics.json $dir/report.md $OUT/paper_scale/ 2>/dev/null
ls .cache/sessionbert/*/ 2>/dev/null | head -30
du -sh .cache/sessionbert/* 2>/dev/null
