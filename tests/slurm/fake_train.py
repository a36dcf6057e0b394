"""Stand-in for ``pretrain.py`` that follows the launch contract, for the SLURM tests.

    python tests/slurm/fake_train.py --config CFG output_dir=DIR --resume auto [train.steps=N]
                                     [fake.step_seconds=S] [--local_rank=R]

* Rank variables: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as set by a launcher, or
  derived from SLURM_* with ``mae_curriculum.engine.dist.rank_env_from_slurm`` when RANK is unset.
* A real gloo process group; every step all-reduces a "stop" flag, so all ranks agree.
* SIGUSR1 or SIGTERM: at the next step boundary all ranks stop, rank 0 writes
  ``DIR/checkpoints/latest.json`` (step), barrier, exit 75.
* ``--resume auto``: start from ``DIR/checkpoints/latest.json`` when present.
* Finished: rank 0 writes ``DIR/final.json`` {"step", "samples", "epoch"}, exit 0.
* Each executed step is printed as ``[r<rank>] step N``, so a test can check that no step was done
  twice or skipped across a requeue.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

PREEMPTED = 75


def _rank_env() -> None:
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        return
    try:
        from mae_curriculum.engine.dist import rank_env_from_slurm
    except ImportError:  # keep the stand-in usable without the package
        def rank_env_from_slurm(e):
            return {"RANK": e["SLURM_PROCID"], "LOCAL_RANK": e.get("SLURM_LOCALID", "0"),
                    "WORLD_SIZE": e.get("SLURM_NTASKS", "1"), "MASTER_ADDR": e["MASTER_ADDR"],
                    "MASTER_PORT": e["MASTER_PORT"]}
    os.environ.update(rank_env_from_slurm(dict(os.environ)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--resume", default="auto")
    ap.add_argument("--local_rank", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    ov = dict(o.split("=", 1) for o in args.overrides)
    out = Path(ov["output_dir"])
    total = int(ov.get("train.steps", 20))
    step_s = float(ov.get("fake.step_seconds", 0.25))
    batch = int(ov.get("train.batch_size", 4))

    stop = {"sig": None}

    def on_signal(signum, frame):
        if stop["sig"] is None:
            stop["sig"] = signum
            print(f"got signal {signal.Signals(signum).name}", flush=True)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    _rank_env()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"start rank={rank} world={world} local_rank={os.environ.get('LOCAL_RANK')} "
          f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
          f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)

    ckpt = out / "checkpoints" / "latest.json"
    step = 0
    if args.resume == "auto" and ckpt.exists():
        step = json.loads(ckpt.read_text())["step"]
        print(f"resumed from step {step}", flush=True)

    flag = torch.zeros(1)
    while step < total:
        time.sleep(step_s)
        step += 1
        print(f"[r{rank}] step {step}", flush=True)
        flag.fill_(1.0 if stop["sig"] is not None else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and step < total:
            dist.barrier()
            if rank == 0:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step}))
                tmp.replace(ckpt)
            dist.barrier()
            print(f"preempted: checkpoint at step {step}, exit {PREEMPTED}", flush=True)
            dist.destroy_process_group()
            return PREEMPTED

    dist.barrier()
    if rank == 0:
        (out / "final.json").write_text(json.dumps(
            {"step": step, "samples": step * batch * world, "epoch": 1}))
    print(f"finished at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
