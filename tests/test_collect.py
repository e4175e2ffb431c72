"""The engine's runs raise the cyclic collector's thresholds and put them back, whatever happens."""

from __future__ import annotations

import gc

import pytest

from batchllm.engine.collect import RUN_THRESHOLDS, fewer_collections


def test_thresholds_rise_inside_and_come_back_after_an_error() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), fewer_collections():
        assert gc.get_threshold() == tuple(max(a, b) for a, b in zip(RUN_THRESHOLDS, before, strict=False))
        assert gc.isenabled()  # fewer collections, not none: cycles are still freed
        raise RuntimeError("a failed run")
    assert gc.get_threshold() == before


def test_a_run_of_the_engine_restores_them(engine) -> None:
    before = gc.get_threshold()
    seen = []
    engine.generate(["Say hi."], progress=lambda done, total: seen.append(gc.get_threshold()))
    assert seen and seen[0][0] >= RUN_THRESHOLDS[0]
    assert gc.get_threshold() == before
