"""Training counters that define where a run is; saved in every checkpoint and restored on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Counters:
    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # loader batches consumed (all of them, skipped ones included)
    epoch: int = 0
    step_in_epoch: int = 0  # loader batches consumed in the current epoch
    samples: int = 0  # images consumed, all ranks
    decoded: int = 0  # of those, decoded from their own sample (replay rows and corrupt stand-ins are not)
    progress: float = 0.0  # fraction of the training budget spent (drives LR and curriculum)
    flops: float = 0.0  # training FLOPs actually spent, all ranks
    full_flops: float = 0.0  # what the same samples would have cost at the final size without pruning
    nonfinite_skips: int = 0
    corrupt_samples: int = 0
    rollbacks: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Counters":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
