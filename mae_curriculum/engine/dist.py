"""Process-group set-up for every way a run is started.

* ``deepspeed [--num_gpus N] pretrain.py ...``: the launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*.
* ``srun python pretrain.py ...`` under SLURM: RANK etc. are derived from SLURM_PROCID / SLURM_LOCALID /
  SLURM_NTASKS / SLURM_JOB_NODELIST (one task per GPU, as DeepSpeed's maintainers advise under SLURM).
* ``python pretrain.py ...``: a one-process run sets the variables itself (no MPI discovery, no mpi4py).

Several nodes: one launcher per node with its node rank (``deepspeed --no_ssh --node_rank K``, as
``launch/slurm/deepspeed_per_node.sbatch`` runs it, or ``srun`` with one task per rank); ranks are global, LOCAL_RANK
is the rank within the node.

Lost peers: every collective is bounded by ``train.dist_timeout_s`` (:func:`init_distributed` for the default
group, :func:`apply_timeout` for the groups DeepSpeed creates itself, which torch would otherwise give its 30-minute
default). A collective that fails (a dead peer's connection reset) or times out (a peer that hangs) raises inside
``torch.distributed``; :func:`is_comm_failure` recognises it, the run lifecycle exits with status 75 (requeue) and
:func:`mark_broken` makes :func:`shutdown` skip the barrier a dead peer would never join.
"""

from __future__ import annotations

import os
import re
import socket
import traceback
from datetime import timedelta
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


_broken = False  # a collective failed: the peers are gone, nothing more is sent to them


def init_distributed(timeout_s: float | None = None) -> None:
    """The default process group (gloo on CPU, NCCL on GPU); ``timeout_s`` (``train.dist_timeout_s``) bounds the
    rendezvous and every collective on it (torch's default: 30 minutes for gloo, 10 for NCCL)."""
    import deepspeed

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **kw)
    if timeout_s is not None and dist.get_world_size() > 1:
        # DeepSpeed's own world group (its parameter broadcast and gradient all-reduce) is created on first use,
        # inside deepspeed.initialize; create it now so that it has the timeout from its first collective
        from deepspeed.utils import groups

        clone = getattr(groups, "_clone_world_group", None)
        if clone is not None:
            clone()
        apply_timeout(timeout_s)


def apply_timeout(timeout_s: float) -> int:
    """Set ``timeout_s`` on every process group this rank belongs to, and return how many: DeepSpeed clones the
    world group for its gradient all-reduce with ``new_group(ranks)``, which gets torch's default timeout
    (30 minutes for gloo), not the default group's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    from torch.distributed import distributed_c10d as c10d

    groups = [dist.group.WORLD, *getattr(getattr(c10d, "_world", None), "pg_map", {})]
    done = 0
    for g in dict.fromkeys(groups):  # ordered, without duplicates
        if g is None or c10d._rank_not_in_group(g):
            continue
        dist.set_timeout(timedelta(seconds=timeout_s), g)
        done += 1
    return done


_LOST_PEER = re.compile(r"connection|peer|timed out|timeout|broken pipe|socket|nccl", re.IGNORECASE)


def is_comm_failure(exc: BaseException) -> bool:
    """An error raised by a collective because a peer is gone: a ``torch.distributed.DistError``, or a RuntimeError
    raised inside ``torch.distributed`` that says so (gloo: "Connection reset by peer", "Connection closed by peer",
    "Timed out waiting ...ms"; NCCL errors). Misuse raised there (e.g. mismatched shapes) is not one."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError) or not _LOST_PEER.search(str(exc)):
        return False
    return any(f"torch{os.sep}distributed{os.sep}" in f.filename for f in traceback.extract_tb(exc.__traceback__))


def mark_broken() -> None:
    global _broken
    _broken = True


def broken() -> bool:
    """Whether a collective failed in this process (a peer was lost)."""
    return _broken


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
    return all_reduce_sum_ints([value])[0]


def all_reduce_sum_ints(values: list[int]) -> list[int]:
    """Sums over the ranks of a few integers, in one collective."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.int64, device=device())
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]
    return list(values)


def shutdown(wait_for_peers: bool = True) -> None:
    """End the process group; ``wait_for_peers`` (a run that ended with the other ranks) first meets them at a
    barrier. A rank that fails alone does not: the peers are inside a collective that the barrier would not match,
    and they learn of the failure at once from its closed connections."""
    if not wait_for_peers or _broken:  # after a lost peer a barrier would only wait for the timeout
        return
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()
