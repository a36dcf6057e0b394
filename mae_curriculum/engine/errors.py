"""How a run ends: exit statuses and the one-line errors the command line prints.

| status | meaning |
|---|---|
| 0 | finished |
| 1 | a run-time failure (a bug prints its traceback first) |
| 2 | bad configuration, data, checkpoint or usage: one line naming what to fix |
| 3 | diverged: non-finite losses again after rolling back to the last checkpoint |
| 75 | requeue and resume (EX_TEMPFAIL): preempted after writing a checkpoint, or another rank or node was lost |
|    | (a collective failed or outlasted ``train.dist_timeout_s``; the newest complete checkpoint is resumed) |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 75  # the same status: launch scripts requeue on 75 (launch/slurm, launch/local.sh)


class TrainingError(RuntimeError):
    """A run-level problem reported as one line, with the exit status it ends the run with."""

    def __init__(self, msg: str, code: int = EXIT_FAILED):
        super().__init__(msg)
        self.code = code


def user_error_code(exc: BaseException) -> int | None:
    """The exit status of an error a user can act on (printed as one line), or None for a bug."""
    from mae_curriculum.config import ConfigError
    from mae_curriculum.data.index import DataError
    from mae_curriculum.engine.checkpoint import CheckpointError

    if isinstance(exc, (ConfigError, DataError)):
        return EXIT_USAGE
    if isinstance(exc, TrainingError):
        return exc.code
    if isinstance(exc, CheckpointError):
        return EXIT_FAILED
    return None
