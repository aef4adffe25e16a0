"""experiments/kernel_sass.py: the row-wise kernels compiled offline for sm_90 (Triton's ptxas and nvdisasm, no GPU)
and their SASS counted; bad arguments named."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
pytest.importorskip("triton")
import kernel_sass  # noqa: E402


def test_counts_the_gelu_forward_and_the_dropout_layernorm(tmp_path):
    rows = kernel_sass.main(["--kernels", "gelu_fwd,norm_fwd_dropout,norm_fwd", "--json", str(tmp_path / "k.json")])
    by = {r["kernel"]: r for r in rows}
    assert set(by) == {"gelu_fwd", "norm_fwd_dropout", "norm_fwd"}
    for r in rows:
        assert 10 < r["per_element"] < 200 and r["instructions"] > 500, r
        assert dict(r["top"])  # opcode counts
    # the exp2 / reciprocal of the erfc fit: two MUFU per element; dropout's Philox draws add instructions
    assert by["gelu_fwd"]["mufu_per_element"] == 2.0
    assert by["norm_fwd_dropout"]["per_element"] > by["norm_fwd"]["per_element"] + 10
    assert len((tmp_path / "k.json").read_text().splitlines()) == 3


def test_another_tree_is_compiled_and_the_callers_modules_stay(tmp_path):
    from sessionbert.models import fused_gelu

    (tmp_path / "sessionbert").symlink_to(ROOT / "sessionbert")
    rows = kernel_sass.main(["--tree", str(tmp_path), "--kernels", "gelu_fwd"])
    assert rows[0]["tree"] == str(tmp_path.resolve())
    assert sys.modules["sessionbert.models.fused_gelu"] is fused_gelu


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match=r"--kernels \['gelu'\]"):
        kernel_sass.main(["--kernels", "gelu"])
    with pytest.raises(SystemExit, match="no sessionbert/models there"):
        kernel_sass.main(["--tree", str(tmp_path)])
