#!/usr/bin/env bash
# One H200 call (~5 min), session 11: the attention kernels with software-pipelining depths (num_stages) offered to
# their autotuners beside the tile sizes. The kernels alone (bench_attention.py, triton-db: what the step runs, with
# the autotuner's picks) at seq 128 and 512; then the step: the previous commit (.bench/old_s11, a `git archive` of
# sessionbert/, conf/ and the two benchmarks) and this tree, every switch on, one after the other in this call, this
# tree beside the HF reference, seq 128 and 512.
export PYTHONPATH=$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $R/device.txt
for s in 128 512; do
  python3 experiments/bench_attention.py --lengths .bench/lengths_sim.npy --seq-len $s --variants varlen,triton-db \
    --out $R/bench_attention_seq${s}.json 2>&1 | cut -c1-600
  (cd .bench/old_s11 && python3 experiments/bench_attention.py --lengths ../lengths_sim.npy --seq-len $s --variants triton-db \
    --out $R/bench_attention_seq${s}_prev.json 2>&1 | cut -c1-600)
done
source experiments/device/step_ab.sh
OLD=.bench/old_s11 step_ab prev stages
tar czf $OUT/results.tgz -C $R . && rm -rf $R
