"""Shared command-line handling: ``--config X.yaml [--resume R] [key=value ...]``, one-line errors, exit codes.

Exit statuses are listed in :mod:`mae_curriculum.engine.errors`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

EXIT_USAGE = 2  # = engine.errors.EXIT_USAGE (usage errors are caught before the engine is imported)


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
    """Parse args, run ``main``, and turn the errors a user can act on into one line + exit status
    (:mod:`mae_curriculum.engine.errors`); anything else is a bug and keeps its traceback."""
    args = parser.parse_args(argv)
    for o in args.overrides:
        if "=" not in o:
            return fail(f"unexpected argument '{o}': overrides look like key=value")
    from mae_curriculum.engine import dist as D

    code = 1
    try:
        code = _call(main, args)
    finally:
        D.shutdown(wait_for_peers=code != 1)  # 1: this rank failed alone (a bug, a write error)
    if D.broken():  # a peer is gone: skip the interpreter's teardown, whose process-group clean-up could wait for
        logging.shutdown()  # it (the run's loaders and writers are closed already)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _call(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from mae_curriculum.engine.errors import EXIT_FAILED, user_error_code

    try:
        return main(args)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as e:
        code = user_error_code(e)
        if code is not None:
            return fail(str(e), code)
        logging.getLogger("mae_curriculum").exception("unexpected failure")
        lines = str(e).strip().splitlines() or [""]  # e.g. a loader worker's error: the cause is on its last line
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        return fail(f"{type(e).__name__}: {summary} (a bug? the traceback is above)", EXIT_FAILED)
