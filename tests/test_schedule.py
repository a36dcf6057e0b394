"""Curriculum schedules: stage lookup, built-in sizes/magnitudes, scaling, validation, epochs per stage."""

from __future__ import annotations

import pytest

from mae_curriculum.curriculum.schedule import (
    SCHEDULE_NAMES,
    Schedule,
    Stage,
    build_schedule,
    epochs_per_stage,
)

BUILT_INS = [n for n in SCHEDULE_NAMES if n != "custom"]


def _quadratic(size: int) -> float:
    return float(size * size)


def test_et_plus_plus_sizes_magnitudes_and_boundaries() -> None:
    schedule = build_schedule("efficienttrain++", 224, 16)
    assert schedule.accounting == "compute"
    assert schedule.sizes() == [96, 96, 160, 160, 160, 160, 224, 224, 224, 224]
    assert [s.magnitude for s in schedule.stages] == pytest.approx(list(range(10)))
    assert [s.start for s in schedule.stages] == pytest.approx([i / 10 for i in range(10)])
    for i in range(10):
        assert schedule.stage_at(i / 10).index == i  # start is inclusive, exactly at the boundary
    assert schedule.stage_at(0.3 - 1e-9).index == 2


def test_et_plus_plus_magnitudes_scale_with_max() -> None:
    schedule = build_schedule("efficienttrain++", 224, 16, max_magnitude=4.5)
    assert [s.magnitude for s in schedule.stages] == pytest.approx([4.5 * i / 9 for i in range(10)])


def test_et_plus_plus_variants() -> None:
    assert build_schedule("efficienttrain++-deit", 224, 16).sizes() == [96] * 2 + [160] * 4 + [192] * 2 + [224] * 2
    assert build_schedule("efficienttrain++-convnext", 224, 16).sizes() == [160] * 6 + [224] * 4


def test_efficienttrain_epochs_and_magnitudes() -> None:
    """300 epochs: 160 for epochs 1-180, 192 for 181-240, 224 for 241-300; m = 1,3,5,7,9 in five parts."""
    schedule = build_schedule("efficienttrain", 224, 16)
    assert schedule.accounting == "epochs"
    size_at_epoch = [schedule.stage_at(epoch / 300).size for epoch in range(300)]
    assert size_at_epoch == [160] * 180 + [192] * 60 + [224] * 60
    magnitude_at_epoch = [schedule.stage_at(epoch / 300).magnitude for epoch in range(300)]
    assert magnitude_at_epoch == [1.0] * 60 + [3.0] * 60 + [5.0] * 60 + [7.0] * 60 + [9.0] * 60


def test_stage_lookup_edges() -> None:
    schedule = build_schedule("efficienttrain", 224, 16)
    assert schedule.stage_at(0.0).index == 0
    assert schedule.stage_at(0.6).size == 192 and schedule.stage_at(0.6 - 1e-12).size == 160
    assert schedule.stage_at(0.8).size == 224
    assert schedule.stage_at(1.0) == schedule.stages[-1]
    assert schedule.stage_at(7.5) == schedule.stages[-1]
    for bad in (-1e-9, float("nan")):
        with pytest.raises(ValueError, match="progress must be >= 0"):
            schedule.stage_at(bad)


def test_constant_schedule() -> None:
    schedule = build_schedule("constant", 192, 16, max_magnitude=7.0)
    assert schedule.stages == (Stage(index=0, size=192, magnitude=7.0, start=0.0, end=1.0),)
    assert schedule.accounting == "epochs"


def test_linear_schedule_rises_from_96_to_final() -> None:
    sizes = build_schedule("linear", 224, 16).sizes()
    assert len(sizes) == 10 and sizes[0] == 96 and sizes[-1] == 224
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("name", BUILT_INS)
@pytest.mark.parametrize("final_size,patch_size", [(256, 16), (64, 8), (224, 14), (32, 16)])
def test_scaled_sizes_are_patch_multiples(name: str, final_size: int, patch_size: int) -> None:
    schedule = build_schedule(name, final_size, patch_size)
    for size in schedule.sizes():
        assert size % patch_size == 0 and patch_size <= size <= final_size
    assert schedule.sizes()[-1] == final_size
    assert schedule.sizes() == sorted(schedule.sizes())


def test_scaling_to_256_and_64() -> None:
    assert build_schedule("efficienttrain++", 256, 16).sizes() == [112] * 2 + [176] * 4 + [256] * 4
    assert build_schedule("efficienttrain++", 64, 8).sizes() == [24] * 2 + [48] * 4 + [64] * 4
    assert build_schedule("efficienttrain", 256, 16).sizes() == [176] * 3 + [224, 256]


def test_custom_schedule() -> None:
    entries = [
        {"size": 96, "fraction": 0.2, "magnitude": 0},
        {"size": 160, "fraction": 0.3},
        {"size": 224, "fraction": 0.5},
    ]
    schedule = build_schedule("custom", 224, 16, custom=entries, accounting="epochs")
    assert schedule.sizes() == [96, 160, 224] and schedule.accounting == "epochs"
    assert [s.magnitude for s in schedule.stages] == [0.0, 9.0, 9.0]
    assert schedule.stage_at(0.2).size == 160 and schedule.stage_at(0.5).size == 224
    assert build_schedule("custom", 224, 16, custom=entries).accounting == "compute"


@pytest.mark.parametrize(
    "entries,match",
    [
        ([{"size": 100, "fraction": 1.0}], "size 100 .* patch size 16"),
        ([{"size": 256, "fraction": 1.0}], "size 256 .* final size 224"),
        ([{"size": 96, "fraction": 0.5}, {"size": 224, "fraction": 0.4}], "sum to 1"),
        ([{"size": 96, "fraction": 0.0}, {"size": 224, "fraction": 1.0}], "fraction must be > 0"),
        ([{"size": 96, "fraction": -0.5}, {"size": 224, "fraction": 1.5}], "fraction must be > 0"),
        ([{"size": 96, "fraction": 1.0, "magnitude": 12}], "magnitude"),
        ([{"size": 96, "frac": 1.0}], "keys"),
        ([{"size": 96.0, "fraction": 1.0}], "must be an int"),
        ([], "at least one stage"),
    ],
)
def test_bad_custom_schedules_raise(entries: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_schedule("custom", 224, 16, custom=entries)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid names: constant, efficienttrain"):
        build_schedule("cosine", 224, 16)
    with pytest.raises(ValueError, match="final size 200 .* patch size 16"):
        build_schedule("efficienttrain++", 200, 16)
    with pytest.raises(ValueError, match="only allowed with"):
        build_schedule("efficienttrain++", 224, 16, custom=[{"size": 224, "fraction": 1.0}])
    with pytest.raises(ValueError, match="only allowed with"):
        build_schedule("custom", 224, 16)
    with pytest.raises(ValueError, match="accounting is fixed"):
        build_schedule("efficienttrain", 224, 16, accounting="compute")
    with pytest.raises(ValueError, match="accounting must be one of"):
        build_schedule("custom", 224, 16, custom=[{"size": 224, "fraction": 1.0}], accounting="steps")


def test_schedule_must_tile_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="tile"):
        Schedule("gap", "epochs", (Stage(0, 96, 0.0, 0.0, 0.4), Stage(1, 224, 9.0, 0.5, 1.0)))


def test_epochs_per_stage_for_et_plus_plus() -> None:
    schedule = build_schedule("efficienttrain++", 224, 16)
    got = epochs_per_stage(schedule, 300, _quadratic)
    assert got == pytest.approx([300 * (224 / b) ** 2 / 10 for b in schedule.sizes()])
    assert got[0] > got[-1] == pytest.approx(30.0)


def test_epochs_per_stage_for_epoch_accounting_and_bad_epochs() -> None:
    schedule = build_schedule("efficienttrain", 224, 16)
    assert epochs_per_stage(schedule, 300, _quadratic) == pytest.approx([60.0] * 5)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        epochs_per_stage(schedule, 0, _quadratic)


def test_compute_accounting_uses_final_size_not_largest_stage() -> None:
    schedule = build_schedule("custom", 224, 16, custom=[{"size": 112, "fraction": 1.0}])
    assert epochs_per_stage(schedule, 10, _quadratic) == pytest.approx([40.0])


def test_budget_counts_flops_apart_from_its_progress_unit():
    """Fine-tuning's budget unit is images (or B^2), not FLOPs: with ``flops`` given, the counters get FLOPs and the
    progress the unit; without it (pre-training, whose unit is its FLOP count) both use ``cost``."""
    from mae_curriculum.engine.progress import Budget
    from mae_curriculum.engine.state import Counters

    sched = build_schedule("efficienttrain++", final_size=32, patch_size=4)
    images = Budget(sched, 32, lambda s: float(s * s), epochs=1.0, epoch_images=100, flops=lambda s: 7.0 * s**3)
    c = Counters()
    images.consume(c, 16, 10)
    assert c.flops == 10 * 7.0 * 16**3 and c.full_flops == 10 * 7.0 * 32**3
    assert c.progress == 10 * 16 * 16 / (100 * 32 * 32)
    plain = Budget(sched, 32, lambda s: float(s * s), epochs=1.0, epoch_images=100)
    c = Counters()
    plain.consume(c, 16, 10)
    assert c.flops == 10 * 16.0 * 16
