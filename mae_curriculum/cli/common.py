"""Shared command-line handling: ``--config X.yaml [--resume R] [key=value ...]``, one-line errors, exit codes.

Exit status: 0 finished, 2 configuration/data/usage error, 3 diverged (non-finite losses after a rollback),
75 preempted after writing a checkpoint (requeue and resume), 1 other run-time failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

EXIT_USAGE = 2


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (newest complete checkpoint in output_dir, if any), 'none', or a checkpoint folder")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; nothing to pass by hand")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4 train.epochs=2")
    return p


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)
    return code


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parse args, run ``main``, and turn known user-facing errors into one line + exit status."""
    from mae_curriculum.config import ConfigError
    from mae_curriculum.data.index import DataError

    args = parser.parse_args(argv)
    for o in args.overrides:
        if "=" not in o:
            return fail(f"unexpected argument '{o}': overrides look like key=value")
    try:
        return main(args)
    except ConfigError as e:
        return fail(str(e))
    except DataError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:
        code = getattr(e, "code", None)
        if type(e).__name__ in ("TrainingError", "CheckpointError") and isinstance(code, int):
            return fail(str(e), code)
        if type(e).__name__ == "CheckpointError":
            return fail(str(e), 1)
        logging.getLogger("mae_curriculum").exception("unexpected failure")
        return fail(f"{type(e).__name__}: {e} (a bug? the traceback is above)", 1)
    finally:
        import gc

        from mae_curriculum.engine import dist as D

        # drop a failed run's DataLoader now: its persistent workers ignore SIGTERM (the main process owns
        # preemption), so leaving them to interpreter shutdown can hang the exit
        gc.collect()
        D.shutdown()
