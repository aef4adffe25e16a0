#!/usr/bin/env bash
# Sourced by the session-11 device scripts: the packed step with every fused switch, first with an older tree
# (OLD: a `git archive` of sessionbert/, conf/ and the benchmarks under .bench/, run from there without the HF
# reference), then with this tree beside the reference, seq ${SEQS:-128 512}, one after the other in the same call.
# Writes $R/bench_gpu_$1.{json,md} (older tree) and $R/bench_gpu_$2.{json,md} (this tree) and copies the two tables to
# $OUT. Usage: OLD=.bench/old_s11 step_ab prev joined
# The first benchmark process of a call ran ~3% slow in session 13 (the older tree at seq 128: 784.9k first, 811.4k /
# 812.3k when interleaved later in the next call, fused_kernels_dev/s13_call6_order/): a short warm-up process runs
# first, and its numbers are not kept (WARM=0 skips it); ROUNDS=2 repeats the pair, alternating.
STEP_SW="--only-packed --fused-qkv only --fused-norm only --fused-gelu only --fused-residual only --fused-ce only --fused-attention only"
step_ab() {
  local sw=$STEP_SW
  [ "${WARM:-1}" = 1 ] && python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens 128 \
    --steps 20 --out /tmp/step_ab_warm.json > /dev/null 2>&1
  (cd "$OLD" && python3 experiments/bench_gpu.py --lengths ../lengths_sim.npy --no-peer $sw --seq-lens ${SEQS:-128 512} \
    --out $R/bench_gpu_$1.json --md $R/bench_gpu_$1.md 2>&1 | grep -E '^\||Error' | cut -c1-300)
  python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --peer .bench/hf_peer_mlm.py $sw --seq-lens ${SEQS:-128 512} \
    --out $R/bench_gpu_$2.json --md $R/bench_gpu_$2.md 2>&1 | grep -E '^\||Error' | cut -c1-300
  # ROUNDS=2 (or more): the two trees again, alternating, without the reference: bench_gpu_$1_2.json, bench_gpu_$2_2.json
  local i
  for i in $(seq 2 ${ROUNDS:-1}); do
    (cd "$OLD" && python3 experiments/bench_gpu.py --lengths ../lengths_sim.npy --no-peer $sw --seq-lens ${SEQS:-128 512} \
      --out $R/bench_gpu_$1_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-300)
    python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $sw --seq-lens ${SEQS:-128 512} \
      --out $R/bench_gpu_$2_$i.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-300
  done
  cp $R/bench_gpu_$2.md $R/bench_gpu_$1.md $OUT/ 2>/dev/null
}

# One pair without the reference, seq ${SEQS:-128}: the older tree ($OLD) then this tree, into $R/$1.json and $R/$2.json;
# $OUT/results.tgz is rewritten after each run, so a call cut by its limit keeps what ran. Usage: OLD=... ab_pair a b
ab_pair() {
  (cd "$OLD" && python3 experiments/bench_gpu.py --lengths ../lengths_sim.npy --no-peer $STEP_SW --seq-lens ${SEQS:-128} \
    --out $R/$1.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-200)
  tar czf $OUT/results.tgz -C $R .
  python3 experiments/bench_gpu.py --lengths .bench/lengths_sim.npy --no-peer $STEP_SW --seq-lens ${SEQS:-128} \
    --out $R/$2.json 2>&1 | grep -E '^\| ours|Error' | cut -c1-200
  tar czf $OUT/results.tgz -C $R .
}
