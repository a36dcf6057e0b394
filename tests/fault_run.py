#!/usr/bin/env python
"""Run ``pretrain.py`` / ``finetune.py`` with fault-injection hooks registered (tests only; nothing here is
reachable from a user's config).

    python tests/fault_run.py pretrain --kill-at-step 5 --nan-at-micro-steps 10,11,12 -- --config ... key=value

Faults: SIGKILL to itself after optimizer step N, after the checkpoint of step N is complete, or while saving
step N (DeepSpeed's files written, the completion marker not yet); ENOSPC while saving step N; the loss replaced
by NaN at the given micro-steps; an exception inside every loader worker after N samples, the worker then
ignoring SIGTERM (patched before the workers fork, so only they see it).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Faults:
    def __init__(self, a: argparse.Namespace):
        self.a = a

    def on_loss(self, run, loss):
        return loss * float("nan") if run.counters.micro_step in self.a.nan_at_micro_steps else loss

    def after_step(self, run):
        if run.counters.step == self.a.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def before_checkpoint_marker(self, step):
        if step == self.a.kill_during_save_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.a.disk_full_at_step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def after_checkpoint(self, step):
        if step == self.a.kill_after_save_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def break_loader_workers(after: int) -> None:
    from torch.utils.data import get_worker_info

    from mae_curriculum.data import loader

    original = loader.ShardStream.__iter__

    def failing_iter(self):
        if get_worker_info() is None:  # the main process: unchanged
            yield from original(self)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that will not go quietly
        for i, sample in enumerate(original(self)):
            if i == after:
                raise ValueError("injected worker failure")
            yield sample

    loader.ShardStream.__iter__ = failing_iter


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("script", choices=["pretrain", "finetune"])
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--kill-after-save-at-step", type=int, default=-1)
    p.add_argument("--kill-during-save-at-step", type=int, default=-1)
    p.add_argument("--disk-full-at-step", type=int, default=-1)
    p.add_argument("--nan-at-micro-steps", type=lambda s: {int(v) for v in s.split(",") if v}, default=set())
    p.add_argument("--worker-error-after-samples", type=int, default=-1)
    a = p.parse_args(argv[:split])
    from mae_curriculum.engine import hooks

    if a.worker_error_after_samples >= 0:
        break_loader_workers(a.worker_error_after_samples)

    hooks.register(Faults(a))
    if a.script == "pretrain":
        from mae_curriculum.cli.pretrain import main as entry
    else:
        from mae_curriculum.cli.finetune import main as entry
    return entry(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
