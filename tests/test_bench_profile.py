"""The profile's account of GPU idle time: the union of kernel intervals over all streams, and the gaps."""

from __future__ import annotations

import pytest

from bench.profile import idle_gaps, kind_of


def test_idle_gaps_by_hand() -> None:
    # two overlapping kernels (two streams), two touching ones, then gaps of 10, 59 and 1,931 us
    gpu = idle_gaps([(0, 10), (5, 20), (30, 40), (40, 41), (2041, 2050), (100, 110)])
    assert gpu["busy_ms"] == pytest.approx(0.050) and gpu["span_ms"] == pytest.approx(2.050)
    assert gpu["idle_ms"] == pytest.approx(2.000)
    assert gpu["idle_by_gap_ms"] == pytest.approx(
        {"<10us": 0, "<100us": 0.069, "<1000us": 0, ">=1000us": 1.931}
    )
    gaps = [v for g in gpu["largest_gaps"] for v in (g["gap_ms"], g["at_ms"])]
    assert gaps == pytest.approx([1.931, 0.110, 0.059, 0.041, 0.010, 0.020])  # (gap, at) longest first
    assert idle_gaps([])["busy_ms"] == 0.0
    assert idle_gaps([(3, 8)])["idle_ms"] == 0.0 and idle_gaps([(3, 8)])["busy_ms"] == pytest.approx(0.005)


def test_kernel_kinds() -> None:
    assert kind_of("_attention_kernel") == "attention"
    assert kind_of("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT") == "gemm"
    assert kind_of("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert kind_of("something_new") == "other"
