"""bench.gemm and bench.overlap off the GPU: their row lists, and a clear refusal without CUDA."""

from __future__ import annotations

import pytest
import torch

from bench import gemm, overlap


def test_rows_are_lists_and_inclusive_ranges() -> None:
    assert gemm.parse_rows("432,512") == [432, 512]
    assert gemm.parse_rows("256:352:32,4096") == [256, 288, 320, 352, 4096]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("bench", [gemm, overlap])
def test_without_cuda_they_refuse(bench, capsys) -> None:
    assert bench.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out
