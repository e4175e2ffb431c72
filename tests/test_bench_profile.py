"""The profile's account of GPU idle time: the union of kernel intervals over all streams, and the gaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profile import host_in_gaps, idle_gaps, kind_of, kind_walls


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
    assert kind_of("_gate_up_silu_kernel") == "gemm"  # the gate/up GEMM with SiLU-and-mul in its epilogue
    assert kind_of("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert kind_of("something_new") == "other"


def test_kind_walls_count_overlapping_kernels_of_a_kind_once() -> None:
    # two attention kernels on two streams overlap by 40 us; a GEMM overlaps one of them (other kind)
    named = [
        ("_attention_kernel", 0, 100),
        ("_attention_kernel", 60, 160),
        ("nvjet_tst_128x256", 150, 250),
        ("_rope_kernel", 250, 260),
    ]
    assert kind_walls(named) == pytest.approx({"attention": 0.160, "gemm": 0.100, "rope": 0.010})
    assert list(kind_walls(named)) == ["attention", "gemm", "rope"]  # longest first


def test_host_in_gaps_by_hand() -> None:
    # busy spans (0, 100), (1100, 1200), (1300, 1400), (3400, 3500): gaps of 1,000, 100 and 2,000 us
    kernels = [(0, 100), (1100, 1200), (1300, 1400), (3400, 3500)]
    host = [
        ("bl::schedule", 50, 600),  # 500 us of the first gap
        ("cudaStreamSynchronize", 500, 1150),  # 600 us of the first gap, the short gap not counted
        ("bl::forward", 1350, 4000),  # the whole last gap
        ("aten::mm", 2000, 2500),  # nested in bl::forward: 500 us more under its own name
        ("late", 5000, 6000),  # after every gap
    ]
    out = host_in_gaps(kernels, host)
    assert out["gaps"] == 2 and out["gap_ms"] == pytest.approx(3.0)
    assert out["by_name_ms"] == pytest.approx(
        {"bl::forward": 2.0, "cudaStreamSynchronize": 0.6, "bl::schedule": 0.5, "aten::mm": 0.5}
    )
    assert next(iter(out["by_name_ms"])) == "bl::forward"  # longest first
    assert out["uncovered_ms"] == pytest.approx(0.0)
    bare = host_in_gaps(kernels, [("bl::schedule", 150, 350)])
    assert bare["uncovered_ms"] == pytest.approx(2.8)  # 1,000 + 2,000 us of gaps, 200 us covered
    assert host_in_gaps([], host)["gaps"] == 0
    # an event over both counted gaps (and the short one between them), one starting inside the short
    # gap, and a name nested in itself (a recursive call): counted once
    wide = host_in_gaps(
        kernels,
        [("wide", 10, 3450), ("from_short", 1250, 1500), ("rec", 2000, 2600), ("rec", 2100, 2200)],
    )
    assert wide["by_name_ms"] == pytest.approx({"wide": 3.0, "from_short": 0.1, "rec": 0.6})
    assert wide["uncovered_ms"] == pytest.approx(0.0)


def test_step_labels_name_the_engine_steps_and_are_undone(tmp_path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    from batchllm.engine import Engine, SamplingParams
    from bench.generate import write_tiny_model
    from bench.profile import labelled, step_labels

    engine = Engine(write_tiny_model(tmp_path / "tiny"), device="cpu", load_format="dummy", seed=0)
    targets = step_labels(engine)

    def held() -> list[tuple[bool, object]]:  # what each owner itself holds (not what it inherits)
        return [(attr in vars(owner), vars(owner).get(attr)) for _, owner, attr in targets]

    before = held()
    prompts = [[*range(1, 19), 20 + i] for i in range(4)]  # one shared prefix, four members
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    plain = [r.token_ids for r in engine.generate(prompts, params)]
    with labelled(targets), profile(activities=[ProfilerActivity.CPU]) as prof:
        labelled_ids = [r.token_ids for r in engine.generate(prompts, params)]
    assert labelled_ids == plain
    names = {ev.name for ev in prof.events()}
    for step in ("schedule", "forward", "layout", "attention_prepare", "model", "head_launch", "settle"):
        assert f"bl::{step}" in names, step
    assert held() == before


def test_labelled_leaves_inherited_methods_inherited() -> None:
    from bench.profile import labelled

    class Base:
        def step(self) -> int:
            return 1

    class Child(Base):
        pass

    with labelled([("step", Child, "step")]):
        assert "step" in vars(Child) and Child().step() == 1
    assert "step" not in vars(Child) and Child.step is Base.step
    with (
        pytest.raises(TypeError, match="not a plain function"),
        labelled([("n", Child, "__init_subclass__")]),
    ):
        pass
