"""SessionBERT: user personas and new-service recommendation from console session trajectories."""
import os as _os

# CPU threads sleep instead of spinning between parallel regions. Set here, before anything imports torch, because
# the OpenMP runtime reads it once when torch loads it. libgomp's default spins each idle thread for ~300k
# iterations after every parallel region; on a 2-core machine shared with other processes (CI, a colleague's tests)
# the spinners take the cores the next region needs, and every small op (an AdamW update, a LayerNorm) waits for a
# scheduler time slice. Measured on such a machine (load average 2-6; tiny BERT training step, seq_len 64, 2 threads):
# 0.6-2.3 s -> 0.10-0.19 s per step, as fast as 1 thread; experiments/results/ablations_cpu/NOTE.md has the rest.
# Any OMP_WAIT_POLICY already in the environment wins (ACTIVE restores spinning).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
