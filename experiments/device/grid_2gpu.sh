#!/usr/bin/env bash
# One device call on a 2-GPU host: the same 4-job grid (experiment=smoke on the GPU, 4 seeds) with the joblib_gpu
# launcher at 2 parallel jobs (one per GPU) and at 1 job at a time; separate caches so neither reuses the other.
export PYTHONPATH=$PWD:$PWD/.whl/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GRID="experiment=smoke trainer=gpu logger=csv seed=10,11,12,13 hydra/launcher=joblib_gpu"
for n in 2 1; do
  t0=$(date +%s.%N)
  python3 train.py -m $GRID hydra.launcher.n_jobs=$n hydra.sweep.dir=/tmp/grid_n$n paths.cache_dir=/tmp/cache_n$n \
    > $OUT/grid_n$n.log 2>&1
  rc=$?
  t1=$(date +%s.%N)
  python3 - "$n" "$t0" "$t1" "$rc" <<'PY' | tee -a $OUT/grid_2gpu.jsonl
import json, sys, glob
n, t0, t1, rc = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
jobs = sorted(glob.glob(f"/tmp/grid_n{n}/*/metrics.json"))
gpus = []
for j in sorted(glob.glob(f"/tmp/grid_n{n}/*/job_status.json")):
    gpus.append(json.load(open(j)))
print(json.dumps({"parallel_jobs": n, "wall_seconds": round(t1 - t0, 1), "exit_code": rc, "jobs_done": len(jobs),
                  "job_status": gpus}))
PY
  cp /tmp/grid_n$n/multirun.yaml $OUT/grid_n${n}_multirun.yaml 2>/dev/null
done
grep -h -i "pinned\|CUDA_VISIBLE" $OUT/grid_n*.log | head -8
