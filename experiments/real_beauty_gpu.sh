#!/usr/bin/env bash
# Amazon Beauty on one GPU (issue 5): our BERT next-item model (conf/experiment/real_beauty.yaml) and a few
# variants, all at once on one H200 (small models: each uses a fraction of the GPU), each with a time budget
# so the whole script fits one 10-minute device call. Needs torch, numpy, pyyaml only (no Hydra, no pandas).
#
#   device tool: run(command="bash experiments/real_beauty_gpu.sh", kind="nvidia-h200", timeout_s=600)
#   results:     $OUT/beauty_<variant>.json (metrics, per-epoch history, seconds, config) and .log
#   then here:   copy $OUT to experiments/results/beauty_gpu/: realdata.results_json (real_beauty.yaml) points at
#                beauty_chosen.json there (the variant with the best validation score) for the table rows.
#   CPU check:   SMOKE=1 OUT=/tmp/beauty_smoke bash experiments/real_beauty_gpu.sh
#
# Variants (the epoch of each is chosen on validation NDCG@10, full ranking; the test users are never used
# for a choice): base = the config; noattr = without attribute embeddings; nomlm = without the MLM stage;
# h128 = hidden 128; drop03 = dropout 0.3; len200 = max_len 200 (Beauty's longest history is 204);
# cl = plus DuoRec's dropout-contrastive term (weight 0.1, temperature 1; Qiu et al. WSDM 2022).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/beauty_gpu}
mkdir -p "$OUT"
BUDGET=${BUDGET:-420}     # seconds of next-item training per variant (then test scoring, ~10 s on a GPU)
DEVICE=${DEVICE:-cuda}
EXTRA=()
if [[ "${SMOKE:-0}" == 1 ]]; then
  DEVICE=cpu; BUDGET=1
  EXTRA=(max_users=300 train.epochs=1 train.mlm_epochs=1 train.eval_every=1)
fi
python - <<'PY'
import torch, numpy, yaml
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
export OMP_NUM_THREADS=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A VARIANTS=(
  [base]=""
  [noattr]="model.attributes=false"
  [nomlm]="train.mlm_epochs=0"
  [h128]="model.hidden=128"
  [drop03]="model.dropout=0.3"
  [len200]="model.max_len=200"
  [cl]="train.cl_weight=0.1"
)
[[ "${SMOKE:-0}" == 1 ]] && VARIANTS=([base]="" [cl]="train.cl_weight=0.1")
pids=()
for name in "${!VARIANTS[@]}"; do
  # shellcheck disable=SC2086
  python -m sessionbert.realdata._beauty_core --device "$DEVICE" --out "$OUT/beauty_$name.json" \
    --set train.time_budget_s="$BUDGET" "${EXTRA[@]}" ${VARIANTS[$name]} > "$OUT/beauty_$name.log" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
python - "$OUT" <<'PY'
import json, sys, pathlib
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("beauty_*.json")):
    if f.stem == "beauty_chosen":
        continue
    r = json.loads(f.read_text())
    o, t = r["ours"], r["train"]
    rows.append(f"| {f.stem[7:]} | {o['HR@5']:.4f} | {o['NDCG@5']:.4f} | {o['HR@10']:.4f} | {o['NDCG@10']:.4f} | "
                f"{o['HR@20']:.4f} | {r['ours_sampled99']['HR@5']:.4f} | {t['best_val']:.4f} | {t['epochs_run']} | "
                f"{t['total_seconds']:.0f} |")
hdr = ("| variant | HR@5 | NDCG@5 | HR@10 | NDCG@10 | HR@20 | HR@5 (99 neg) | val NDCG@10 | epochs | s |\n"
       "|---|---|---|---|---|---|---|---|---|---|")
# the variant to report is chosen on validation (best_val, full ranking), never on the test numbers
best = max(pathlib.Path(sys.argv[1]).glob("beauty_*.json"), key=lambda f: json.loads(f.read_text())["train"]["best_val"])
(pathlib.Path(sys.argv[1]) / "beauty_chosen.json").write_text(best.read_text())
text = hdr + "\n" + "\n".join(rows) + f"\n\nchosen on validation: {best.stem[7:]} (copied to beauty_chosen.json)"
print(text)
pathlib.Path(sys.argv[1], "summary.md").write_text(text + "\n")
PY
exit $fail
