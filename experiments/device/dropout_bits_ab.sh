#!/usr/bin/env bash
# One H200 call (~6 min), for a session after 14: the dropout-mask-as-bits lead (notes_speed.md, session 14 leads;
# not merged) against the shipped code. Session 15 ran its short form (s15_bits_quick.sh): no gain, dropped. The
# shipped tree is copied to .bench/old_bits first, then the patch is
# applied to this copy of the working tree (the device's copy has no .git), then step_ab.sh: a warm-up
# process, shipped / patched / shipped / patched at seq 128 and 512, the patched run beside the reference; then the
# LayerNorm and embeddings kernels alone, shipped then patched. Needs .bench carried (lengths_sim.npy, hf_peer_mlm.py,
# site/). If it wins: `git apply experiments/results/kernel_sass_s14/dropout_bits.patch`, and the results here.
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R .bench/old_bits
cp -r sessionbert conf experiments .bench/old_bits/
P=experiments/results/kernel_sass_s14/dropout_bits.patch  # git apply works outside a repository too; else patch(1)
{ git apply $P || patch -p1 < $P; } > $R/patch.txt 2>&1 || { cat $R/patch.txt; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
source experiments/device/step_ab.sh
SEQS="${SEQS:-128 512}" ROUNDS=${ROUNDS:-2} OLD=.bench/old_bits step_ab shipped bits
tar czf $OUT/results.tgz -C $R .
(cd .bench/old_bits && python3 experiments/bench_fused_norm.py --groups norm,embed --out $R/kernels_shipped.json 2>&1 \
  | cut -c1-300)
python3 experiments/bench_fused_norm.py --groups norm,embed --out $R/kernels_bits.json 2>&1 | cut -c1-300
tar czf $OUT/results.tgz -C $R . && rm -rf $R
