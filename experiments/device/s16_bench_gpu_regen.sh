#!/usr/bin/env bash
# One H200 call, session 16: `make bench-gpu` as a user runs it (the lengths file written again from the simulator, a
# warm-up process, then the reference and our packed path with every fused kernel at seq 128 and 512 in one
# process), on the code of session 14's headline (results/bench_gpu_rows.md: 857.6k / 783.3k real tokens/s, 2.30x /
# 5.98x): does the one command give the committed figures back on another host and day? PIP=true: the host has the
# packages and no network (make's install step becomes a no-op). Needs .bench carried (hf_peer_mlm.py, site/).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt 2>&1
( while sleep 15; do cp experiments/results/bench_gpu.json $R/ 2>/dev/null; done ) &
copier=$!
# without make on the host: the same recipe, as `make -n bench-gpu PIP=true` printed it here
command -v make >/dev/null || make() { sed -n '/^bench-gpu:/,/^$/p' Makefile | grep -P '^\t' | grep -v '^\t#' |
  sed 's/^\t//; s/\$(PY)/python3/g' | sed -e ':a' -e '/\\$/N; s/\\\n//; ta' | bash -ex; }
{ time make bench-gpu PIP=true; } > $R/make_bench_gpu.log 2>&1
kill $copier 2>/dev/null
cp experiments/results/bench_gpu.json experiments/results/bench_gpu.md $R/
tail -30 $R/make_bench_gpu.log
