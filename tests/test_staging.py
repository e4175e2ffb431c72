"""Static graph arrays in one buffer: fills, views and one copy per step (CPU here, CUDA on the device)."""

from __future__ import annotations

import pytest
import torch

from batchllm.engine.staging import ALIGN, Field, Staging

FIELDS = {
    "slots": Field((5,), torch.int64, 7),
    "lens": Field((3,), torch.int32, 1),
    "tables": Field((3, 4), torch.int32, -1),
}


def _check(device: torch.device) -> None:
    staging = Staging(FIELDS, device)
    dev = staging.device
    assert dev["slots"].tolist() == [7] * 5 and dev["lens"].tolist() == [1] * 3
    assert dev["tables"].shape == (3, 4) and int(dev["tables"].min()) == -1
    assert all(t.data_ptr() % ALIGN == 0 for t in dev.values())
    for step in range(5):  # more steps than twins: each twin is written again after its copy ran
        host = staging.host()
        host["slots"][:] = range(step, step + 5)
        host["lens"][:] = step
        host["tables"][:, :2] = [[step, 1], [2, 3], [4 + step, 5]]
        staging.ship(tail_rows=2)  # the last field's first two rows only
        assert dev["slots"].tolist() == list(range(step, step + 5))
        assert dev["lens"].tolist() == [step] * 3 and dev["tables"][0, :2].tolist() == [step, 1]
        assert dev["tables"][:, 2:].tolist() == [[-1, -1]] * 3  # never written: the starting fill
        assert dev["tables"][2].tolist() == [-1] * 4  # the third row stays as it was on the device


def test_staging_twins_take_turns_and_ship_what_a_step_wrote() -> None:
    """The CUDA path's logic (twins in turns, the last field's rows only) with plain CPU copies."""
    _check(torch.device("cpu"))
    staging = Staging(FIELDS, torch.device("cpu"))
    first = staging.host()
    staging.ship()
    assert staging.host() is not first  # the other twin: the host may write while a copy waits


@pytest.mark.gpu
def test_staging_on_cuda_ships_each_step_in_one_copy() -> None:
    _check(torch.device("cuda"))
