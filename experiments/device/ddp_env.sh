# Sourced by the 2-GPU device scripts (ddp_overlap_check.sh, s15_*.sh): environment, results folder $R, the packed
# path's switches $sw for bench_ddp.py, and show FILE (one line per run of a bench_ddp.py output).
export PYTHONPATH=$PWD:$PWD/.bench/site PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # KINDS.md: never NVLink multicast
R=$OUT/r; mkdir -p $R
sw="--lengths .bench/lengths_sim.npy --packed --fused-qkv --fused-norm --fused-gelu --fused-residual --fused-ce --fused-attention"
show() { python3 -c "
import json
for r in json.load(open('$1'))['runs']:
    print('$1'.split('/')[-1], r['devices'], r.get('ddp_kwargs'), r['tokens_per_step_per_gpu'], 'tiles', r.get('tiles'),
          'epochs', r.get('epochs_timed'), round(r['real_tokens_per_s']), round(1000 * r['seconds'] / r['steps'], 1), 'ms/step')"; }
