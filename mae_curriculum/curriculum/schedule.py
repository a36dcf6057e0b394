"""Curriculum schedules: training progress in [0, 1] -> stage (input bandwidth B, RandAugment magnitude).

Two ways of counting progress (``Schedule.accounting``):

* ``"epochs"``: images seen / (epochs * N). Stage fractions are fractions of the image budget.
* ``"compute"``: FLOPs spent / (epochs * N * flops(final_size)). Stage fractions are fractions of the
  compute budget, so a low-resolution stage processes more images (see :func:`epochs_per_stage`).

Built-in schedules (sizes given for ``final_size = 224`` and scaled for other sizes):

* ``constant``: one stage at ``final_size``, magnitude ``max_magnitude``; epochs accounting.
* ``efficienttrain`` (ET, ICCV 2023; 300-epoch reference): B = 160 for 60% of the epochs, 192 for 20%,
  224 for 20%; general final size gamma: ``round(gamma*160/224)``, the mean of that and gamma, gamma.
  RandAugment follows the v1 code: five equal parts with m = 1, 3, 5, 7, 9 (scaled by max_magnitude/9),
  giving five stages with sizes 160, 160, 160, 192, 224. Epochs accounting.
* ``efficienttrain++`` (ET++, TPAMI 2024): ten stages of equal compute, B = 96x2, 160x4, 224x4 and
  m_i = max_magnitude * i / 9. Variants ``efficienttrain++-deit`` (96x2, 160x4, 192x2, 224x2) and
  ``efficienttrain++-convnext`` (160x6, 224x4). Compute accounting.
* ``linear``: ten equal-compute stages with B rising linearly from ``round(final*96/224)`` to ``final``,
  m_i = max_magnitude * i / 9. Compute accounting.
* ``custom``: stages from a list of ``{"size", "fraction", "magnitude" (optional, default max_magnitude)}``
  dicts (e.g. from YAML), with the ``accounting`` keyword (default ``"compute"``).

Every scaled size is ``gamma * B / 224`` rounded to the nearest multiple of ``patch_size`` (halves round up,
at least one patch). Every size must be a multiple of ``patch_size`` and at most ``final_size``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Stage", "Schedule", "SCHEDULE_NAMES", "ACCOUNTING_MODES", "build_schedule", "epochs_per_stage",
           "replay_by_group", "ramp_magnitudes"]

ACCOUNTING_MODES = ("epochs", "compute")
_REFERENCE_SIZE = 224
_ET_PLUS_PLUS_SIZES: dict[str, tuple[int, ...]] = {
    "efficienttrain++": (96, 96, 160, 160, 160, 160, 224, 224, 224, 224),
    "efficienttrain++-deit": (96, 96, 160, 160, 160, 160, 192, 192, 224, 224),
    "efficienttrain++-convnext": (160, 160, 160, 160, 160, 160, 224, 224, 224, 224),
}
SCHEDULE_NAMES = ("constant", "efficienttrain", *_ET_PLUS_PLUS_SIZES, "linear", "custom")


@dataclass(frozen=True)
class Stage:
    """One curriculum stage, active for progress in ``[start, end)`` (the last one also at 1.0)."""

    index: int
    size: int
    magnitude: float
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    """An ordered, gap-free tuple of stages covering progress ``[0, 1]``.

    ``final_size`` is the size the compute budget is measured in (``flops(final_size)`` per image-epoch);
    ``None`` means the largest stage size.
    """

    name: str
    accounting: str
    stages: tuple[Stage, ...]
    final_size: int | None = None

    def __post_init__(self) -> None:
        if self.accounting not in ACCOUNTING_MODES:
            raise ValueError(f"accounting must be one of {ACCOUNTING_MODES}, got {self.accounting!r}")
        if not self.stages:
            raise ValueError(f"schedule {self.name!r} has no stages")
        bounds = [self.stages[0].start] + [s.end for s in self.stages]
        starts = [s.start for s in self.stages]
        if bounds[0] != 0.0 or bounds[-1] != 1.0 or starts != bounds[:-1] or any(s.end <= s.start for s in self.stages):
            raise ValueError(f"schedule {self.name!r}: stages must tile [0, 1] in order, got bounds {bounds}")

    @property
    def reference_size(self) -> int:
        """Size whose per-image FLOPs define one epoch of compute (``final_size`` or the largest stage)."""
        return self.final_size if self.final_size is not None else max(self.sizes())

    def stage_at(self, progress: float) -> Stage:
        """Stage active at ``progress``; progress >= 1 gives the last stage, < 0 (or NaN) raises ValueError."""
        if not progress >= 0.0:
            raise ValueError(f"progress must be >= 0, got {progress!r}")
        ends = [s.end for s in self.stages[:-1]]
        return self.stages[bisect.bisect_right(ends, progress)]

    def sizes(self) -> list[int]:
        """Input size of each stage, in order."""
        return [s.size for s in self.stages]


def _round_to_patch(value: float, patch_size: int) -> int:
    """Nearest multiple of ``patch_size`` (halves round up), at least one patch."""
    return max(patch_size, math.floor(value / patch_size + 0.5) * patch_size)


def scale_size(size: int, final_size: int, patch_size: int) -> int:
    """Scale a size given for a 224 final size to ``final_size``."""
    return _round_to_patch(final_size * size / _REFERENCE_SIZE, patch_size)


def _make_stages(sizes: Sequence[int], magnitudes: Sequence[float], fractions: Sequence[float]) -> tuple[Stage, ...]:
    """Stages with boundaries at the exact prefix sums of ``fractions`` (the last end forced to 1.0)."""
    total = len(fractions)
    if len(set(fractions)) == 1:
        bounds = [i / total for i in range(total + 1)]
    else:
        bounds = [math.fsum(fractions[:i]) for i in range(total + 1)]
    bounds[-1] = 1.0
    return tuple(
        Stage(index=i, size=int(sizes[i]), magnitude=float(magnitudes[i]), start=bounds[i], end=bounds[i + 1])
        for i in range(total)
    )


def _check_sizes(stages: Sequence[Stage], final_size: int, patch_size: int) -> None:
    for stage in stages:
        if stage.size < 1 or stage.size % patch_size or stage.size > final_size:
            raise ValueError(
                f"stage size {stage.size} must be a positive multiple of patch size {patch_size} "
                f"and <= final size {final_size}"
            )


def ramp_magnitudes(n: int, max_magnitude: float, accounting: str) -> list[float]:
    """The RandAugment magnitude of each of ``n`` equal stages, rising to ``max_magnitude``: EfficientTrain's
    (``accounting: epochs``, its v1 code's m = 1, 3, 5, 7, 9 of 9 over five stages: the middle of each stage's share)
    or EfficientTrain++'s (``compute``: m = stage index, 0 .. 9 over ten stages)."""
    if n == 1:
        return [float(max_magnitude)]
    if accounting == "compute":
        return [max_magnitude * i / (n - 1) for i in range(n)]
    return [max_magnitude * (2 * i + 1) / (2 * n - 1) for i in range(n)]


def _efficienttrain(final_size: int, patch_size: int, max_magnitude: float) -> Schedule:
    low = scale_size(160, final_size, patch_size)
    mid = _round_to_patch((low + final_size) / 2, patch_size)
    sizes = (low, low, low, mid, final_size)
    magnitudes = ramp_magnitudes(5, max_magnitude, "epochs")
    return Schedule("efficienttrain", "epochs", _make_stages(sizes, magnitudes, [0.2] * 5), final_size)


def _ten_stage(name: str, sizes: Sequence[int], max_magnitude: float, final_size: int) -> Schedule:
    magnitudes = ramp_magnitudes(10, max_magnitude, "compute")
    return Schedule(name, "compute", _make_stages(sizes, magnitudes, [0.1] * 10), final_size)


def _linear_sizes(final_size: int, patch_size: int) -> list[int]:
    first = _round_to_patch(final_size * 96 / _REFERENCE_SIZE, patch_size)
    return [_round_to_patch(first + (final_size - first) * i / 9, patch_size) for i in range(10)]


def _custom(entries: list[dict[str, Any]], accounting: str, max_magnitude: float, final_size: int) -> Schedule:
    if not entries:
        raise ValueError("custom schedule needs at least one stage, got an empty list")
    sizes: list[int] = []
    magnitudes: list[float] = []
    fractions: list[float] = []
    for entry in entries:
        unknown = set(entry) - {"size", "fraction", "magnitude"}
        if unknown or not {"size", "fraction"} <= set(entry):
            raise ValueError(f"custom stage needs keys size, fraction (and optional magnitude), got {entry!r}")
        size, fraction = entry["size"], float(entry["fraction"])
        magnitude = float(entry.get("magnitude", max_magnitude))
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"custom stage size must be an int, got {size!r}")
        if not fraction > 0:
            raise ValueError(f"custom stage fraction must be > 0, got {fraction!r}")
        if not 0 <= magnitude <= max_magnitude:
            raise ValueError(f"custom stage magnitude must be in [0, {max_magnitude}], got {magnitude!r}")
        sizes.append(size)
        magnitudes.append(magnitude)
        fractions.append(fraction)
    if abs(math.fsum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"custom stage fractions must sum to 1, got {math.fsum(fractions)!r} from {fractions}")
    return Schedule("custom", accounting, _make_stages(sizes, magnitudes, fractions), final_size)


def build_schedule(
    name: str,
    final_size: int,
    patch_size: int,
    max_magnitude: float = 9.0,
    custom: list[dict[str, Any]] | None = None,
    accounting: str | None = None,
) -> Schedule:
    """Build a named curriculum schedule for ``final_size`` (see the module docstring for the names).

    ``custom`` and ``accounting`` (default ``"compute"``) are only allowed with ``name="custom"``; the
    built-in schedules have a fixed accounting.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
    if patch_size < 1 or final_size < 1 or final_size % patch_size:
        raise ValueError(f"final size {final_size} must be a positive multiple of patch size {patch_size}")
    if not max_magnitude >= 0:
        raise ValueError(f"max_magnitude must be >= 0, got {max_magnitude!r}")
    if (custom is not None) != (name == "custom"):
        raise ValueError(f"custom stages are required for, and only allowed with, name='custom' (got {name!r})")
    if accounting is not None and name != "custom":
        raise ValueError(f"accounting is fixed for schedule {name!r}; got accounting={accounting!r}")
    if name == "constant":
        schedule = Schedule(name, "epochs", _make_stages([final_size], [max_magnitude], [1.0]), final_size)
    elif name == "efficienttrain":
        schedule = _efficienttrain(final_size, patch_size, max_magnitude)
    elif name in _ET_PLUS_PLUS_SIZES:
        sizes = [scale_size(b, final_size, patch_size) for b in _ET_PLUS_PLUS_SIZES[name]]
        schedule = _ten_stage(name, sizes, max_magnitude, final_size)
    elif name == "linear":
        schedule = _ten_stage(name, _linear_sizes(final_size, patch_size), max_magnitude, final_size)
    else:
        assert custom is not None
        schedule = _custom(custom, accounting or "compute", max_magnitude, final_size)
    _check_sizes(schedule.stages, final_size, patch_size)
    return schedule


def epochs_per_stage(schedule: Schedule, epochs: float, flops_fn: Callable[[int], float]) -> list[float]:
    """Image-epochs each stage processes for a budget of ``epochs`` (epochs at the reference size).

    Epochs accounting: ``fraction * epochs``. Compute accounting: ``fraction * epochs * flops(final) /
    flops(B)`` (ET++ with flops proportional to B^2: ``E * (224/B)^2 / 10``). For reporting.
    """
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    out = []
    for stage in schedule.stages:
        image_epochs = (stage.end - stage.start) * epochs
        if schedule.accounting == "compute":
            image_epochs *= flops_fn(schedule.reference_size) / flops_fn(stage.size)
        out.append(image_epochs)
    return out


def replay_by_group(schedule: Schedule) -> list[int]:
    """One replay factor per stage (``curriculum.replay``) by the EfficientTrain++ authors' rule, 4 / 2 / 1 for
    the low / middle / final stage groups: 4 at the schedule's smallest size, 1 at its largest, 2 between."""
    sizes = sorted({st.size for st in schedule.stages})
    return [1 if st.size == sizes[-1] else (4 if st.size == sizes[0] else 2) for st in schedule.stages]


def schedule_for(curriculum: Any, final_size: int, patch_size: int) -> Schedule:
    """The schedule a config's ``curriculum`` section describes (``schedule``, ``stages``, ``accounting``,
    ``max_magnitude``) for a model of ``final_size`` / ``patch_size``: the one place configs become schedules."""
    extra = {"accounting": curriculum.accounting} if curriculum.schedule == "custom" else {}
    return build_schedule(curriculum.schedule, final_size=final_size, patch_size=patch_size,
                          max_magnitude=curriculum.max_magnitude, custom=curriculum.stages or None, **extra)
