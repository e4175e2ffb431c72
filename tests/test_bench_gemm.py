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


def test_overlap_is_judged_against_the_serial_layer_without_carveout() -> None:
    def run(serial: float, halves: float, chain: float, pingpong: float) -> dict:
        return {"ms": {"serial": serial, "halves": halves, "chain": chain, "pingpong": pingpong}}

    cases = {
        "a900/carveout=0": run(2.0, 2.0, 1.9, 1.98),
        "a900/carveout=24": run(2.4, 2.1, 1.8, 1.7),  # flattering against its own 2.4
        "a205/carveout=24": run(0.6, 0.5, 0.5, 0.5),  # no uncarved run: not judged
    }
    assert overlap.against_uncarved(cases) == {
        "a900/carveout=0": {"halves": 1.0, "chain": 0.95, "pingpong": 0.99},
        "a900/carveout=24": {"halves": 1.05, "chain": 0.9, "pingpong": 0.85},
    }
