#!/usr/bin/env bash
# Two chained H200 calls, session 13: PART=ab (1., ~450 s) then PART=micro (2.-5., ~150 s); most important first
# (results.tgz is rewritten after each part; the call's limit may cut the end). Needs .bench carried: lengths_sim.npy, hf_peer_mlm.py, old_s13 (a `git archive` of ed7fd75's sessionbert/,
# conf/ and benchmarks), site/ (hydra, omegaconf, antlr4), fp8site/ (torchao 0.18 without its compiled
# extensions: apart, as transformers probes torchao on import).
# 1. the step with every switch, the previous commit (.bench/old_s13) then this tree beside the HF reference, seq 64,
#    128 and 512 (step_ab.sh): #48 (the embeddings' table gradients through embedding_dense_backward) and #49
#    (attention-backward programs of 64 keys when every session fits 64: seq 64); seq 512 also refreshes the headline
#    there with session 12's embeddings kernel (not measured at 512 before);
# 2. the attention kernels against fp32 (attention_check.py, now with sessions up to 32 and 64: the new programs);
# 3. attention alone at seq 64, the previous tree then this one (bench_attention.py, the shipped triton-db variant);
# 4. the embeddings kernel alone, with the old (`fused_index_add`) and new scatter (bench_fused_norm.py --groups embed);
# 5. FP8 GEMMs on BERT-base's linear layers (fp8_bench.py: torchao Float8Linear and _scaled_mm alone, against bf16).
export PYTHONPATH=$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
if [ "$PART" = ab ]; then
  source experiments/device/step_ab.sh
  SEQS="${SEQS:-64 128 512}" OLD=.bench/old_s13 step_ab prev s13
  tar czf $OUT/results.tgz -C $R . && rm -rf $R
  exit
fi
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/device/attention_check.py > $R/attention_check.json \
  2>$R/attention_check.err; cut -c1-600 $R/attention_check.json; tail -2 $R/attention_check.err
(cd .bench/old_s13 && python3 experiments/bench_attention.py --lengths ../lengths_sim.npy --seq-len 64 \
  --variants triton-db --out $R/bench_attention_seq64_prev.json 2>&1 | cut -c1-300)
python3 experiments/bench_attention.py --lengths .bench/lengths_sim.npy --seq-len 64 --variants triton-db \
  --out $R/bench_attention_seq64_s13.json 2>&1 | cut -c1-300
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD:$PYTHONPATH python3 experiments/bench_fused_norm.py --groups embed --out $R/bench_embed.json 2>&1 \
  | cut -c1-300
tar czf $OUT/results.tgz -C $R .
PYTHONPATH=$PWD/.bench/fp8site:$PWD:$PYTHONPATH python3 experiments/device/fp8_bench.py --out $R/fp8_bench.json 2>$R/fp8_bench.err \
  | cut -c1-300; tail -3 $R/fp8_bench.err | cut -c1-300
tar czf $OUT/results.tgz -C $R . && rm -rf $R
