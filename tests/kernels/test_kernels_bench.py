"""bench/kernels.py: its arithmetic, and that it exits cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
_spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_figures_for_mixtral() -> None:
    mixtral = bench.SHAPES[0]
    assert (mixtral.hidden, mixtral.inter, mixtral.experts, mixtral.top_k) == (4096, 14336, 8, 2)
    # One token, two experts: 2 experts x 3 matrices x 4096 x 14336 bf16 values = 704.6 MB.
    weights = 2 * 3 * 4096 * 14336 * 2
    assert bench.expert_bytes(2, 1, mixtral, 2) == weights + 2 * 4096 * 2
    assert bench.decode_target_ms(2, mixtral, 2, 3.0e12) == pytest.approx(1.5 * weights / 3.0e9)
    assert bench.expert_flops(4096, mixtral) == 2.0 * 4096 * 2 * 3 * 4096 * 14336


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_no_cuda_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--tokens", "1"]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: nothing timed"
