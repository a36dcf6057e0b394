"""Process-group set-up for every way a run is started.

* ``deepspeed [--num_gpus N] pretrain.py ...``: the launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*.
* ``srun python pretrain.py ...`` under SLURM: RANK etc. are derived from SLURM_PROCID / SLURM_LOCALID /
  SLURM_NTASKS / SLURM_JOB_NODELIST (one task per GPU, as DeepSpeed's maintainers advise under SLURM).
* ``python pretrain.py ...``: a one-process run sets the variables itself (no MPI discovery, no mpi4py).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Mapping

import torch
import torch.distributed as dist


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                a, b = r.split("-", 1)
                hosts += [f"{prefix}{i:0{len(a)}d}{suffix}" for i in range(int(a), int(b) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def rank_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a task started by ``srun``."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job % 20000),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_rank_env(local_rank: int | None = None) -> None:
    """Make sure RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT are set before init_distributed."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", str(local_rank or 0))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        return
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.update(rank_env_from_slurm(env))
        return
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port())})


def init_distributed() -> None:
    import deepspeed

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_flags(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise MAX over ranks (one collective for several yes/no questions)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def all_reduce_sum_int(value: int) -> int:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.int64, device=device())
        dist.all_reduce(t)
        return int(t.item())
    return value


def shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()
