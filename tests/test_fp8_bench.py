"""experiments/device/fp8_bench.py (issue 6, the FP8 lead) on a CPU: its row-wise recipe's numerics and its rows. The
timings themselves need an H100 / H200 (results under experiments/results/fused_kernels_dev/s13_call*_fp8*)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "device"))
import fp8_bench  # noqa: E402


def test_row_wise_quantisation_keeps_each_row_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows six decades apart
    q, scale = fp8_bench.quant_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    assert float(((back - x).norm(dim=1) / x.norm(dim=1)).max()) < 0.05  # 3 mantissa bits: ~2-3% per row
    assert torch.allclose(back.abs().amax(1), x.abs().amax(1), rtol=1e-6)  # each row's largest value is exact


def test_gemm_rows_on_cpu(monkeypatch):
    """Every variant is emitted; the row-wise FP8 GEMMs' errors against fp32 sit well above bf16's and below 6%."""
    monkeypatch.setattr(fp8_bench, "gpu_ms", lambda step, repeats: (step(), 0.0)[1])
    rows = fp8_bench.gemm_rows(256, 64, 96, torch.device("cpu"), 1)
    assert [r["variant"] for r in rows] == ["mm_bf16", "scaled_mm_only", "rowwise_fwd_dgrad_gemms",
                                            "rowwise_fwd_dgrad_with_casts", "rowwise_casts_x_dy_only"]
    errs = rows[2]
    assert all(b < 0.005 for b in errs["bf16_rel_err_y_dx"])
    assert all(0.01 < e < 0.06 for e in errs["rel_err_y_dx"])


def test_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        fp8_bench.main(["--only-gemms"])
