"""Training metrics of both engines: the mean loss since the last log line, TensorBoard scalars at a fixed
step interval, images per second and a progress bar on rank 0. Losses stay on the device between log steps
(no host sync per step)."""

from __future__ import annotations

import time

import torch

from mae_curriculum.engine import dist as D
from mae_curriculum.engine.logging import Scalars


class TrainMetrics:
    def __init__(self, tb: Scalars, every_steps: int, device: torch.device, bar_total: int = 0, bar_initial: int = 0,
                 desc: str = "train", show_bar: bool = False):
        self.tb, self.every = tb, every_steps
        self.loss_sum, self.loss_n = torch.zeros((), device=device), 0
        self.last_loss = float("nan")
        self._t, self._samples = time.time(), 0
        self.bar = None
        if show_bar and D.is_main():
            from tqdm import tqdm

            self.bar = tqdm(total=bar_total, initial=min(bar_initial, bar_total), unit="step", dynamic_ncols=True,
                            desc=desc)

    def start(self, samples: int) -> None:
        """Start the images/s clock (at the run's start or after a resume)."""
        self._t, self._samples = time.time(), samples

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.loss_n += 1

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == 1

    def step(self, step: int, samples: int, scalars_fn) -> None:
        """After optimizer step ``step``: on log steps, write ``scalars_fn(mean_loss, images_per_s)``."""
        if self.bar is not None:
            self.bar.update(1)
        if not self.due(step):
            return
        self.last_loss = (self.loss_sum / max(1, self.loss_n)).item()
        now = time.time()
        ips = (samples - self._samples) / max(1e-9, now - self._t)
        self._t, self._samples = now, samples
        scalars = scalars_fn(self.last_loss, ips)
        self.tb.add(scalars, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", ips=f"{ips:.0f}")
        self.loss_sum.zero_()
        self.loss_n = 0

    def final_loss(self) -> float:
        if self.loss_n:
            self.last_loss = (self.loss_sum / self.loss_n).item()
        return self.last_loss

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
