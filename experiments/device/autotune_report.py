"""bench_fused_norm.py (its arguments), then what Triton's autotuner picked for each kernel of models.fused_norm and
models.fused_gelu, with the fastest configs of its last tuning (the packed training key for the LayerNorm backward:
dropout on, dense bias folded in). For pruning the config lists."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_fused_norm  # noqa: E402

from sessionbert.models import fused_gelu, fused_norm  # noqa: E402

bench_fused_norm.main(sys.argv[1:])
for mod in (fused_norm, fused_gelu):
    for k in (mod._fwd_kernel, mod._bwd_kernel):
        t = getattr(k, "configs_timings", None) or {}
        ms = sorted((float(v[0] if isinstance(v, (list, tuple)) else v), str(c)) for c, v in t.items())
        print(f"{mod.__name__}.{k.base_fn.__name__}: best {k.best_config}; fastest {ms[:6]}; slowest {ms[-2:]}")
