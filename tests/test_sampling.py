"""The keyed sampler: distributions, top-k/top-p truncation, determinism, batch independence."""

from __future__ import annotations

import pytest
import torch

from batchllm.engine.sampling import row_keys, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _draw(
    n: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 7
) -> torch.Tensor:
    logits = LOGITS.repeat(n, 1)
    keys = row_keys(torch.full((n,), seed, dtype=torch.int64), torch.arange(n))
    return sample(
        logits,
        torch.full((n,), temperature),
        torch.full((n,), top_p),
        torch.full((n,), top_k, dtype=torch.int64),
        keys,
    )


def test_frequencies_follow_the_softmax() -> None:
    n = 40_000
    counts = torch.bincount(_draw(n, temperature=0.7), minlength=6).float() / n
    expected = torch.softmax(LOGITS / 0.7, dim=-1)
    assert (counts - expected).abs().max() < 0.01


def test_top_k_and_top_p_truncate() -> None:
    assert set(_draw(5000, top_k=2).tolist()) == {0, 1}
    probs = torch.softmax(LOGITS, dim=-1)  # 0.57, 0.21, 0.13, ...: top_p 0.7 keeps the first two
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert set(_draw(5000, top_p=0.7).tolist()) == {0, 1}
    assert set(_draw(500, top_p=0.01).tolist()) == {0}
    assert set(_draw(500, top_k=1).tolist()) == {0}


def test_greedy_rows_and_determinism() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    temps = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    keys = row_keys(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([10, 10, 10, 10, 10]))
    args = (torch.ones(5), torch.zeros(5, dtype=torch.int64))
    a = sample(logits, temps, *args, keys)
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()
    assert torch.equal(a, sample(logits, temps, *args, keys))
    # a row's token depends on its own logits and key only, not on the other rows of the batch
    alone = sample(logits[3:4], temps[3:4], args[0][3:4], args[1][3:4], keys[3:4])
    assert alone[0] == a[3]


def test_keys_differ_by_seed_and_position() -> None:
    keys = row_keys(torch.tensor([1, 1, 2, 2**62 + 1]), torch.tensor([0, 1, 0, 0]))
    assert len(set(keys.tolist())) == 4


def _near_tie(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 hidden [1, 4] and head [3, 4] whose logits are 16.0, 16.03 and 1.0: 0.03 apart is below
    bf16's resolution at 16 (0.125), so rounded to bf16 the first two tie."""
    w = torch.zeros(3, 4)
    w[0, 0], w[1, 0], w[1, 1], w[2, 2] = 16.0, 16.0, 0.03, 1.0
    hidden = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return hidden.to(device, torch.bfloat16), w.to(device, torch.bfloat16)


def _logits(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from types import SimpleNamespace

    from batchllm.engine.model import CausalLM

    return CausalLM.compute_logits(SimpleNamespace(lm_head_weight=w), hidden)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_reads_float32_logits_of_a_bf16_model(device: str) -> None:
    hidden, w = _near_tie(device)
    assert (hidden @ w.T).argmax(-1).item() == 0  # bf16 logits: tied, the first wins
    logits = _logits(hidden, w)
    assert logits.dtype == torch.float32 and logits.argmax(-1).item() == 1
    torch.testing.assert_close(logits, hidden.float() @ w.float().T, rtol=1e-6, atol=1e-6)


def test_rows_without_top_k_or_top_p_are_never_truncated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 running sum reaches 1 before the tail (one token at ~1 - 1e-10): top_p 1 still keeps
    every token, and only the rows that ask for truncation are truncated, whatever else is in the step."""
    from batchllm.engine import sampling

    x = torch.zeros(2, 1000)
    x[:, 0] = 30.0
    out = sampling._apply_top_k_top_p(x.clone(), torch.tensor([0, 0]), torch.tensor([1.0, 0.5]))
    assert torch.isfinite(out[0]).all() and int(torch.isfinite(out[1]).sum()) == 1
    seen: list[int] = []
    apply = sampling._apply_top_k_top_p
    monkeypatch.setattr(
        sampling, "_apply_top_k_top_p", lambda x, k, p: seen.append(x.shape[0]) or apply(x, k, p)
    )
    keys = row_keys(torch.tensor([1, 2, 3]), torch.tensor([4, 4, 4]))
    sample(x.repeat(2, 1)[:3], torch.ones(3), torch.tensor([1.0, 1.0, 0.9]), torch.tensor([5, 0, 0]), keys)
    assert seen == [2]  # the top_k row and the top_p row, not the plain one
