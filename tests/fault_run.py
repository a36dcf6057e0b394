#!/usr/bin/env python
"""Run ``pretrain.py`` / ``finetune.py`` with fault-injection hooks registered (tests only; nothing here is
reachable from a user's config).

    python tests/fault_run.py pretrain --kill-at-step 5 --nan-at-micro-steps 10,11,12 -- --config ... key=value

Faults: an exception on one rank after optimizer step N (``--bug-at-step N --bug-on-rank R``); SIGKILL to itself
after optimizer step N, after the checkpoint of step N is complete, or while saving
step N (DeepSpeed's files written, the completion marker not yet); ENOSPC while saving step N; the loss replaced
by NaN at the given micro-steps; an exception inside every loader worker after N samples, the worker then
ignoring SIGTERM (patched before the workers fork, so only they see it).

``--record DIR`` (pre-training) also writes what each rank trained on to ``DIR/rank<r>.jsonl``, one line per
micro-batch ``{"epoch", "batch", "step", "ids"}`` and one per epoch start ``{"epoch", "keep_mask_sha1"}``, flushed
line by line so that a SIGKILL leaves every finished line.
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
        if run.counters.step == self.a.bug_at_step and run.rank == self.a.bug_on_rank:
            raise ZeroDivisionError("injected bug")

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


def record_batches(folder: Path) -> None:
    import json

    from mae_curriculum.engine import pretrain

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[int, object] = {}

    def write(run, rec: dict) -> None:
        if run.rank not in files:
            files[run.rank] = open(folder / f"rank{run.rank}.jsonl", "a", buffering=1)
        files[run.rank].write(json.dumps(rec) + "\n")

    train_step, begin_epoch = pretrain.PretrainRun.train_step, pretrain.PretrainRun.begin_epoch

    def recording_step(self, mb, stage):
        write(self, {"epoch": mb.keys[0][0], "batch": mb.keys[0][1], "step": self.counters.step,
                     "ids": mb.ids.tolist()})
        return train_step(self, mb, stage)

    def recording_begin_epoch(self):
        begin_epoch(self)
        write(self, {"epoch": self.counters.epoch, "keep_mask_sha1": self.mask_digests.get(str(self.counters.epoch))})

    pretrain.PretrainRun.train_step, pretrain.PretrainRun.begin_epoch = recording_step, recording_begin_epoch


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
    p.add_argument("--record", type=Path, default=None)
    p.add_argument("--bug-at-step", type=int, default=-1)  # an exception (a bug) after step N on one rank
    p.add_argument("--bug-on-rank", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", default=None)  # the deepspeed launcher puts it first
    a = p.parse_args(argv[:split])
    from mae_curriculum.engine import hooks

    if a.worker_error_after_samples >= 0:
        break_loader_workers(a.worker_error_after_samples)
    if a.record is not None:
        record_batches(a.record)

    hooks.register(Faults(a))
    if a.script == "pretrain":
        from mae_curriculum.cli.pretrain import main as entry
    else:
        from mae_curriculum.cli.finetune import main as entry
    rest = argv[split + 1:]
    return entry(rest if a.local_rank is None else [f"--local_rank={a.local_rank}", *rest])


if __name__ == "__main__":
    sys.exit(main())
