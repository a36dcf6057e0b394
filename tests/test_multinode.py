"""Two "nodes" on one machine: the real ``pretrain.py`` started as a multi-node job is, one launcher per node with
its node rank (``deepspeed --no_ssh --node_rank K``, the command ``launch/slurm/deepspeed_per_node.sbatch`` runs on
each node), 2 ranks per node over loopback (gloo, CPU).

* 2 x 2 ranks: rank mapping as DeepSpeed sees it, samples disjoint over the 4 ranks, the same pruning mask on all
  4, each checkpoint written once; then every process of node 1 is SIGKILLed mid-run and the survivors must exit
  75 (requeue) promptly; the relaunch on one node (1 x 2) resumes from the newest complete checkpoint under the
  documented rule for a changed world size (the current epoch's data order restarts).
* 2 ranks started one process per rank (as srun does), rank 1 frozen (SIGSTOP: a node that hangs, so no connection
  is reset): the survivor exits 75 once ``train.dist_timeout_s`` has passed, not after torch's 30 minutes.
* 2 ranks, rank 1 raises (a bug): both exit 1 at once, not 75 (no requeue into the same bug).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, fault_cmd, pretrain_cmd, read_json

pytestmark = pytest.mark.slow

# 480 train images, 16 per rank: 7 steps per unpruned epoch on 4 ranks; SeTa changes the mask every epoch
RUN = ["train.epochs=3", "curriculum.schedule=constant", "checkpoint.every_steps=3", "checkpoint.keep_last=20",
       "pruning.method=seta", "pruning.ratio=0.3", "train.deterministic=true"]
TIMEOUT_S = 30  # train.dist_timeout_s of the SIGKILL run: a reset connection must end it well before
HANG_TIMEOUT_S = 10  # train.dist_timeout_s of the SIGSTOP run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(out: Path, data: Path, node: int, nodes: int, per_node: int, port: int, *overrides: str,
               record: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """One node's launcher in a session of its own (so that the whole node can be killed), output to a file."""
    hostfile = out.parent / f"{out.name}.hosts{nodes}"
    hostfile.write_text("".join(f"node{k} slots={per_node}\n" for k in range(nodes)))
    launcher = [shutil.which("deepspeed") or "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--no_ssh_check",
                "--node_rank", str(node), "--num_nodes", str(nodes), "--num_gpus", str(per_node),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd = pretrain_cmd(out, data, *overrides, launcher=launcher)
    if record is not None:
        cmd = fault_cmd(cmd, "--record", str(record))
    log = out.parent / f"{out.name}.{nodes}x{per_node}.node{node}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return p, log


def start_ranks(out: Path, data: Path, world: int, *overrides: str, record: Path | None = None,
                faults: tuple[str, ...] = ()) -> list[tuple[subprocess.Popen, Path]]:
    """One process per rank on this node, given its rank in the environment, as ``srun`` starts them under
    ``launch/slurm/pretrain.sbatch`` (no launcher process)."""
    cmd = pretrain_cmd(out, data, *overrides)
    if record is not None:
        faults = (*faults, "--record", str(record))
    if faults:
        cmd = fault_cmd(cmd, *faults)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    started = []
    for k in range(world):
        log = out.parent / f"{out.name}.1x{world}.rank{k}.log"
        with open(log, "w") as f:
            started.append((subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                             env={**env, "RANK": str(k), "LOCAL_RANK": str(k)}), log))
    return started


def wait_for(path: Path, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        bad = [(p.returncode, log.read_text()[-3000:]) for p, log in zip(procs, logs) if p.poll() is not None]
        assert not bad and time.time() < deadline, (f"no {path}", bad)
        time.sleep(0.05)


def wait_for_mid_epoch_checkpoint(out: Path, procs: list[subprocess.Popen], logs: list[Path], epoch: int,
                                  timeout: float = 300) -> Path:
    """The first complete checkpoint taken in the middle of epoch ``epoch`` (``run_state.json`` is written last)."""
    deadline = time.time() + timeout
    while True:
        for f in sorted((out / "checkpoints").glob("step*/run_state.json")):
            try:
                c = json.loads(f.read_text())["counters"]
            except (OSError, ValueError):
                continue  # being written
            if c["epoch"] == epoch and c["step_in_epoch"] > 0 and (f.parent / "complete.json").is_file():
                return f.parent
        bad = [(p.returncode, log.read_text()[-3000:]) for p, log in zip(procs, logs) if p.poll() is not None]
        assert not bad and time.time() < deadline, ("no mid-epoch checkpoint", bad)
        time.sleep(0.05)


def records(folder: Path, rank: int) -> tuple[list[dict], dict[int, str]]:
    """(micro-batches, keep-mask digest per epoch) of one rank, from ``tests/fault_run.py --record``."""
    lines = [json.loads(x) for x in (folder / f"rank{rank}.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if "ids" in x], {x["epoch"]: x["keep_mask_sha1"] for x in lines if "ids" not in x}


@pytest.fixture(scope="module")
def node_death(tmp_path_factory, demo_data) -> dict:
    """2 nodes x 2 ranks; all of node 1 SIGKILLed right after the first checkpoint in the middle of epoch 1; then
    a relaunch on node 0 alone (2 ranks) that finishes the run."""
    root = tmp_path_factory.mktemp("multinode")
    out, rec, rec2 = root / "run", root / "record", root / "record_relaunch"
    port = free_port()
    over = [*RUN, f"train.dist_timeout_s={TIMEOUT_S}"]
    nodes = [start_node(out, demo_data, k, 2, 2, port, *over, record=rec) for k in range(2)]
    procs, logs = [p for p, _ in nodes], [log for _, log in nodes]
    try:
        killed_after = wait_for_mid_epoch_checkpoint(out, procs, logs, epoch=1)
        os.killpg(procs[1].pid, signal.SIGKILL)  # the node's launcher, its launch.py, its ranks, their workers
        t_kill = time.time()
        rc0 = procs[0].wait(timeout=TIMEOUT_S + 60)
        survivors_s = time.time() - t_kill
        procs[1].wait(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"node 1 SIGKILLed: node 0's launcher exited {rc0} after {survivors_s:.1f} s")
    newest_at_kill = sorted(p.parent.name for p in (out / "checkpoints").glob("step*/complete.json"))[-1]
    checkpoints_at_kill = {p.name: sorted(f.name for f in p.iterdir()) for p in (out / "checkpoints").glob("step*")}
    ranks_at_kill = {k: read_json(out / "ranks" / f"rank{k}.json") for k in range(4)}
    status_at_kill = read_json(out / "status.json")

    # the relaunch on node 0 alone: 2 ranks, started one process per rank (as srun does)
    relaunch = start_ranks(out, demo_data, 2, *over, record=rec2)
    try:
        rc_relaunch = [p.wait(timeout=300) for p, _ in relaunch]
    finally:
        for p, _ in relaunch:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    log = relaunch[0][1]
    return {"out": out, "rec": rec, "rec2": rec2, "rc0": rc0, "survivors_s": survivors_s, "log0": logs[0],
            "killed_after": killed_after.name, "newest_at_kill": newest_at_kill,
            "checkpoints_at_kill": checkpoints_at_kill, "ranks_at_kill": ranks_at_kill,
            "status_at_kill": status_at_kill, "rc_relaunch": rc_relaunch, "relaunch_log": log}


def test_ranks_as_deepspeed_sees_them_on_two_nodes(node_death):
    ranks = node_death["ranks_at_kill"]
    for k, r in ranks.items():
        assert (r["rank"], r["world_size"]) == (k, 4)
        assert (r["node_rank"], r["local_rank"]) == (k // 2, k % 2), r
        assert r["deepspeed"] == {"global_rank": k, "local_rank": k % 2, "world_size": 4, "dp_world_size": 4}, r
    assert len({r["pid"] for r in ranks.values()}) == 4


def test_samples_disjoint_and_masks_identical_on_four_ranks(node_death):
    rec = node_death["rec"]
    per_rank = [records(rec, k) for k in range(4)]
    masks = [m for _, m in per_rank]
    assert {0, 1} <= set(masks[0]), masks[0]  # epoch 1 had begun everywhere: step 8 needed all 4 ranks
    for e in (0, 1):
        assert len({m[e] for m in masks}) == 1, (e, masks)
    assert masks[0][0] != masks[0][1]  # the mask changes with the epoch: the comparison is not vacuous
    epoch0 = [[b for b in batches if b["epoch"] == 0] for batches, _ in per_rank]
    assert len({len(b) for b in epoch0}) == 1 and len(epoch0[0]) >= 4  # same number of steps on every rank
    ids = [i for batches in epoch0 for b in batches for i in b["ids"]]
    assert len(ids) == len(set(ids)) == len(epoch0[0]) * 4 * 16  # no sample twice in the epoch, on any rank
    for e in (0, 1):  # batch by batch, the 4 ranks read different samples
        for n in {b["batch"] for b in per_rank[0][0] if b["epoch"] == e}:
            sets = [set(i for b in batches if (b["epoch"], b["batch"]) == (e, n) for i in b["ids"])
                    for batches, _ in per_rank]
            if all(sets):
                assert len(set().union(*sets)) == sum(map(len, sets)) == 64, (e, n)


def test_each_checkpoint_is_written_once_by_the_4_ranks(node_death):
    """Each checkpoint of the 4-rank run: DeepSpeed's model + optimizer file once (global rank 0, not once per
    node), one RNG file per rank, one completeness marker for the 4 ranks."""
    at_kill = node_death["checkpoints_at_kill"]
    complete = [t for t, names in at_kill.items() if "complete.json" in names]
    assert len(complete) >= 3, at_kill
    for tag in complete:
        ck = node_death["out"] / "checkpoints" / tag
        assert at_kill[tag] == ["complete.json", "mp_rank_00_model_states.pt",
                                *[f"rng_rank{k}.pt" for k in range(4)], "run_state.json"], (tag, at_kill[tag])
        marker = read_json(ck / "complete.json")
        assert marker["world_size"] == 4 and tag == f"step{marker['step']:09d}"
        assert sorted(marker["files"]) == [n for n in at_kill[tag] if n not in ("complete.json", "run_state.json")]
        assert read_json(ck / "run_state.json")["world_size"] == 4


def test_node_death_ends_the_survivors_with_requeue_status_promptly(node_death):
    d = node_death
    log = d["log0"].read_text()
    assert d["rc0"] == 75, log[-3000:]  # the deepspeed launcher passes the ranks' status through
    assert d["survivors_s"] < TIMEOUT_S, f"{d['survivors_s']:.1f} s"  # a reset connection: no wait for the timeout
    for k in (0, 1):
        r = d["ranks_at_kill"][k]
        assert r["status"] == "peer_lost" and "exiting 75" in r["error"], r
        assert f"step{r['step']:09d}" >= d["killed_after"]
    assert log.count("error: lost contact with another rank") == 2, log[-3000:]
    assert "Traceback" not in log
    assert d["status_at_kill"]["status"] == "peer_lost"  # rank 0 survived: status.json, which launch scripts read


def test_relaunch_on_one_node_resumes_from_the_newest_complete_checkpoint(node_death):
    """docs/reliability.md: a changed world size restarts the current epoch's data order (logged); step, images,
    progress, pruner scores come back from the checkpoint."""
    d = node_death
    log = d["relaunch_log"].read_text()
    assert d["rc_relaunch"] == [0, 0], log[-3000:]
    assert f"resumed from {d['out'] / 'checkpoints' / d['newest_at_kill']}" in log
    assert d["newest_at_kill"] == d["killed_after"]  # the survivors could not complete another one
    assert "resuming with a different world size or batch size (4 x 16 -> 2 x 16)" in log
    starts = [json.loads(x) for x in (d["out"] / "run_info.jsonl").read_text().splitlines()]
    assert [s["world_size"] for s in starts] == [4, 2]
    saved = read_json(d["out"] / "checkpoints" / d["newest_at_kill"] / "run_state.json")["counters"]
    assert saved["step_in_epoch"] > 0  # a mid-epoch checkpoint: the rule has something to restart
    batches, masks = zip(*(records(d["rec2"], k) for k in range(2)))
    first = batches[0][0]
    assert (first["epoch"], first["batch"], first["step"]) == (saved["epoch"], 1, saved["step"])  # epoch restarts
    assert masks[0] == masks[1] and saved["epoch"] in masks[0]
    epoch = [[b for b in bs if b["epoch"] == saved["epoch"]] for bs in batches]
    ids = [i for bs in epoch for b in bs for i in b["ids"]]
    assert len(ids) == len(set(ids)) == len(epoch[0]) * 2 * 16  # disjoint over the 2 ranks, no repeat
    final, ranks = read_json(d["out"] / "final.json"), [read_json(d["out"] / "ranks" / f"rank{k}.json") for k in (0, 1)]
    assert final["status"] == "finished" and final["samples"] > saved["samples"] and final["step"] > saved["step"]
    assert final["progress"] >= 1 - 1e-9  # the whole budget was trained
    assert ranks[0]["status"] == ranks[1]["status"] == "finished" and ranks[0]["world_size"] == 2


def test_a_hung_node_ends_the_survivor_after_dist_timeout_s(tmp_path, demo_data):
    """Rank 1 ("node 1") frozen with its loader worker (SIGSTOP: its sockets stay open, nothing is reset) after the
    step-3 checkpoint: rank 0 waits in a collective until ``train.dist_timeout_s`` and exits 75. The ranks are
    started as ``srun`` starts them under ``launch/slurm/pretrain.sbatch``, one process per rank given its rank in
    the environment (no launcher processes: cheaper, and the status measured is the rank's own)."""
    out = tmp_path / "hang"
    ranks = start_ranks(out, demo_data, 2, *RUN, "pruning.method=none", f"train.dist_timeout_s={HANG_TIMEOUT_S}")
    procs, logs = [p for p, _ in ranks], [log for _, log in ranks]
    try:
        wait_for(out / "checkpoints" / "step000000003" / "complete.json", procs, logs)
        os.killpg(procs[1].pid, signal.SIGSTOP)
        t_stop = time.time()
        rc0 = procs[0].wait(timeout=HANG_TIMEOUT_S + 60)
        survivor_s = time.time() - t_stop
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                os.killpg(p.pid, signal.SIGCONT)
    print(f"rank 1 SIGSTOPped: rank 0 exited {rc0} after {survivor_s:.1f} s (train.dist_timeout_s={HANG_TIMEOUT_S})")
    log = logs[0].read_text()
    assert rc0 == 75, log[-3000:]
    assert HANG_TIMEOUT_S - 1 <= survivor_s < HANG_TIMEOUT_S + 15, f"{survivor_s:.1f} s"
    assert f"Timed out waiting {HANG_TIMEOUT_S * 1000}ms" in log and "exiting 75" in log, log[-3000:]
    assert "Traceback" not in log
    assert read_json(out / "ranks" / "rank0.json")["status"] == "peer_lost"


def test_a_rank_that_fails_on_a_bug_ends_its_peers_with_failure_not_requeue(tmp_path, demo_data):
    """A lost connection is not always a lost node: a rank that raises (a bug) records ``failed`` and leaves
    without the shutdown barrier; its peer sees the closed connection at once, finds that record and exits 1 too,
    so that the launch scripts do not requeue a run that would fail again."""
    out = tmp_path / "bug"
    ranks = start_ranks(out, demo_data, 2, "train.max_steps=6", f"train.dist_timeout_s={TIMEOUT_S}",
                        faults=("--bug-at-step", "2", "--bug-on-rank", "1"))
    procs, logs = [p for p, _ in ranks], [log for _, log in ranks]
    try:
        rc1 = procs[1].wait(timeout=300)
        t1 = time.time()
        rc0 = procs[0].wait(timeout=TIMEOUT_S + 60)
        after_s = time.time() - t1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    log0, log1 = logs[0].read_text(), logs[1].read_text()
    assert rc1 == 1 and "ZeroDivisionError: injected bug" in log1, log1[-3000:]
    assert rc0 == 1, log0[-3000:]
    assert "error: rank 1 failed (ZeroDivisionError: injected bug); this rank stops too" in log0, log0[-3000:]
    assert after_s < TIMEOUT_S / 2, f"rank 0 left {after_s:.1f} s after rank 1"  # not at the timeout
    assert read_json(out / "ranks" / "rank0.json")["status"] == "failed"


@pytest.mark.parametrize("value, message", [
    ("2", "train.dist_timeout_s must be in [5.0, 86400.0]; got 2.0"),
    ("1e9", "train.dist_timeout_s must be in [5.0, 86400.0]"),
    (".nan", "train.dist_timeout_s: expected a finite number"),
    ("soon", "train.dist_timeout_s: expected a number, got 'soon'"),
])
def test_dist_timeout_is_validated(value, message, demo_data):
    """Pre-training and fine-tuning (both call ``init_distributed(cfg.train.dist_timeout_s)``)."""
    from mae_curriculum.config import ConfigError, PretrainConfig, load_config
    from mae_curriculum.config_finetune import FinetuneConfig

    data = [f"data.train_shards={demo_data / 'train'}", f"data.val_shards={demo_data / 'val'}"]
    for cls, cfg, extra in ((PretrainConfig, "demo.yaml", data),
                            (FinetuneConfig, "finetune_demo.yaml", [*data, "mode=supervised", "finetune.pretrained="])):
        path = ROOT / "configs" / cfg
        assert load_config(cls, path, extra).train.dist_timeout_s == 600.0
        assert load_config(cls, path, [*extra, "train.dist_timeout_s=45"]).train.dist_timeout_s == 45.0
        with pytest.raises(ConfigError) as e:
            load_config(cls, path, [*extra, f"train.dist_timeout_s={value}"])
        assert str(e.value).startswith(message), str(e.value)


def test_comm_failures_are_told_from_other_errors():
    """A lost peer as gloo reports it (a RuntimeError raised inside torch.distributed naming the connection or the
    timeout) or a DistError; not the same words raised elsewhere, nor misuse raised inside torch.distributed."""
    import torch.distributed as dist

    from mae_curriculum.engine import dist as D

    inside = str(Path(dist.__file__).parent / "fake_collective.py")

    def raised(msg: str, where: str) -> BaseException:
        try:
            exec(compile(f"raise RuntimeError({msg!r})", where, "exec"))
        except RuntimeError as e:
            return e
        raise AssertionError

    reset = "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1698: Connection reset by peer."
    timeout = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete"
    assert D.is_comm_failure(raised(reset, inside)) and D.is_comm_failure(raised(timeout, inside))
    assert not D.is_comm_failure(raised(reset, __file__))  # not raised by a collective
    assert not D.is_comm_failure(raised("Tensors must have the same shape", inside))  # a bug: fail, do not requeue
    assert D.is_comm_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not D.is_comm_failure(ValueError("Connection reset by peer"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
