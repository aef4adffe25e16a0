"""SessionBERT: user personas and new-service recommendation from console session trajectories."""
import os as _os

# CPU threads sleep instead of spinning between parallel regions. Set here, before anything imports torch, because
# the OpenMP runtime reads it once when torch loads it. libgomp's default spins each idle thread for ~300k
# iterations after every parallel region; on a 2-core machine shared with other processes (CI, a colleague's tests)
# the spinners take the cores the next region needs, and every small op (an AdamW update, a LayerNorm) waits for a
# scheduler time slice. Measured on such a machine (load average 2-6; tiny BERT training step, seq_len 64, 2 threads):
# 0.6-2.3 s -> 0.10-0.19 s per step, as fast as 1 thread. The price on an idle machine: that step 62-72 -> 80-97 ms
# (waking the sleeping thread), 4% at seq_len 512 (experiments/results/ablations_cpu/NOTE.md). The environment
# wins: OMP_WAIT_POLICY=ACTIVE restores spinning, GOMP_SPINCOUNT=1000 (libgomp) spins briefly, then sleeps.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

__version__ = "0.1.0"
