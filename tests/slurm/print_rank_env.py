"""Stand-in training script for the rank-variable check: writes what the project's SLURM mapping computes.

    python tests/slurm/print_rank_env.py --config CFG --resume auto output_dir=DIR [...]

Writes ``DIR/rank_env/<SLURM_PROCID>.json`` with the result of
``mae_curriculum.engine.dist.rank_env_from_slurm(os.environ)`` (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and the raw SLURM variables and MASTER_* the batch script exported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--resume")
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    ov = dict(o.split("=", 1) for o in args.overrides)
    out = Path(ov["output_dir"]) / "rank_env"
    out.mkdir(parents=True, exist_ok=True)

    from mae_curriculum.engine.dist import rank_env_from_slurm

    mapped = rank_env_from_slurm(dict(os.environ))
    raw = {k: v for k, v in os.environ.items()
           if k.startswith("SLURM_") or k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    record = {"mapped": mapped, "raw": raw, "argv": sys.argv[1:]}
    (out / f"{os.environ.get('SLURM_PROCID', 'x')}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    print(json.dumps(mapped, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
