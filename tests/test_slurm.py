"""The SLURM launch scripts (launch/slurm/*.sbatch), submitted unedited to a real one-node SLURM.

A private cluster (slurmctld + slurmd + munged, as root; tests/slurm/cluster.py) is started once for this
module and stopped at the end, also on failure. The node declares 4 CPUs on the 2-core machine so that the
time-limit job (a sleeping stand-in trainer) runs beside the others.

* rank variables: srun's SLURM_* as mapped by ``mae_curriculum.engine.dist.rank_env_from_slurm``, with
  MASTER_ADDR/MASTER_PORT exported by the batch script (self-submission through env variables, and the
  plain ``sbatch`` form, for pretrain.sbatch and finetune.sbatch).
* the time limit: the unedited ``#SBATCH --signal=USR1@120`` on a 3-minute job reaches the (stand-in)
  trainer, which checkpoints and exits 75; the script requeues; the job resumes and finishes with every
  step done exactly once.
* deepspeed_per_node.sbatch: the same through the deepspeed launcher (``scancel --signal=USR1``).
* the real ``pretrain.py`` on configs/demo.yaml with 2 ranks, pre-empted by hand: it requeues, resumes from
  the checkpoint it wrote and ends with the same step/sample/epoch counts as an uninterrupted run.

Skipped only when not root or slurm-wlm cannot be installed (outside CI; in CI that is a failure).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/ has no __init__.py: make `tests.slurm` importable under any runner
    sys.path.insert(0, str(ROOT))

from tests.slurm.cluster import ClusterUnavailable, OneNodeCluster  # noqa: E402

pytestmark = pytest.mark.slow

FAKE = "tests/slurm/fake_train.py"
PRINT_ENV = "tests/slurm/print_rank_env.py"
CPU_ARGS = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    c = OneNodeCluster(cpus=4)
    try:
        c.__enter__()
    except ClusterUnavailable as e:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"SLURM test cluster unavailable in CI: {e}")
        pytest.skip(f"SLURM test cluster unavailable: {e}")
    try:
        yield c
    finally:
        c.stop()


def job_env(out: Path, **extra: str) -> dict[str, str]:
    return {"OUTPUT_DIR": str(out), "CONFIG": "configs/demo.yaml", "GIT_COMMIT": "test-commit",
            "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def submit(cluster: OneNodeCluster, script: str, out: Path, *overrides: str, env: dict | None = None,
           sbatch_args: list[str] | None = None, cwd: Path = ROOT) -> int:
    out.mkdir(parents=True, exist_ok=True)  # for the batch log (SLURM does not create its folder)
    path = f"launch/slurm/{script}" if cwd == ROOT else str(ROOT / "launch" / "slurm" / script)
    args = [*(sbatch_args if sbatch_args is not None else CPU_ARGS + ["--time=10"]),
            f"--output={out}/slurm-%j.out", path, *overrides]
    return cluster.sbatch(args, env=job_env(out, **(env or {})), cwd=cwd)


def batch_log(out: Path, jid: int) -> str:
    p = out / f"slurm-{jid}.out"
    return p.read_text(errors="replace") if p.exists() else "(no batch log)"


def describe(cluster: OneNodeCluster, out: Path, jid: int) -> str:
    logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-2500:]
                   for p in sorted((out / "logs").glob(f"job{jid}_*.log")))
    return f"\n--- batch log\n{batch_log(out, jid)}{logs}\n--- scontrol\n{cluster.job_info(jid)}"


def wait_for(pred, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def assert_completed(cluster: OneNodeCluster, out: Path, jid: int, timeout: float) -> dict[str, str]:
    info = cluster.wait_job(jid, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(cluster, out, jid)
    return info


def fake_steps(log_text: str, rank: int = 0) -> list[int]:
    """Steps the stand-in trainer's rank executed, in order (lines of 2 ranks may interleave in one file)."""
    return [int(m) for m in re.findall(rf"\[r{rank}\] step (\d+)", log_text)]


# ------------------------------------------------------------------------ the time-limit job (background)
TL_STEPS, TL_STEP_S = 260, 0.25  # 65 s of "training": more than the 30-60 s before the first USR1


@pytest.fixture(scope="module")
def time_limit_job(cluster, tmp_path_factory):
    """Submitted early, checked by the last test: a 3-minute job with the script's own --signal=USR1@120.

    SLURM checks for the warning signal every ~30 s, so it arrives 30-60 s after the start; after a requeue
    the clock starts again, so a second pre-emption may happen too. Either way every step runs once."""
    out = tmp_path_factory.mktemp("time_limit")
    jid = submit(cluster, "pretrain.sbatch", out, f"train.steps={TL_STEPS}", f"fake.step_seconds={TL_STEP_S}",
                 env={"TRAIN_SCRIPT": FAKE}, sbatch_args=CPU_ARGS + ["--time=3"])
    return jid, out


def test_time_limit_job_starts(cluster, time_limit_job):
    jid, out = time_limit_job
    cluster.wait_state(jid, "RUNNING", timeout=30)
    info = cluster.job_info(jid)
    assert info["TimeLimit"] == "00:03:00" and info["Requeue"] == "1", info


# ------------------------------------------------------------------------------------- rank variables
def _check_rank_env(cluster, out: Path, jid: int, job_name: str, overrides: list[str]):
    info = assert_completed(cluster, out, jid, timeout=60)
    assert info["JobName"] == job_name
    recs = [json.loads((out / "rank_env" / f"{r}.json").read_text()) for r in range(2)]
    port = str(20000 + jid % 20000)
    for r, rec in enumerate(recs):
        m = rec["mapped"]
        assert m == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                     "MASTER_ADDR": cluster.host, "MASTER_PORT": port}, rec
        # exported by the batch script, and what the mapping computes on its own without them
        assert rec["raw"]["MASTER_ADDR"] == cluster.host and rec["raw"]["MASTER_PORT"] == port
        from mae_curriculum.engine.dist import rank_env_from_slurm

        bare = {k: v for k, v in rec["raw"].items() if not k.startswith("MASTER_")}
        assert rank_env_from_slurm(bare) == m
        assert rec["raw"]["SLURM_NTASKS"] == "2" and rec["raw"].get("SLURM_RESTART_COUNT", "0") == "0"
        argv = rec["argv"]
        assert argv[:4] == ["--config", "configs/demo.yaml", "--resume", "auto"], argv
        assert argv[4:] == [f"output_dir={out}", *overrides], argv
    run_info = (out / "run_info" / f"job_{jid}.txt").read_text()
    assert f"=== job {jid} restart 0" in run_info and "commit=test-commit" in run_info, run_info
    assert (out / "run_info" / "exit_codes" / f"job{jid}_restart0" / "task1").read_text().strip() == "0"
    assert "finished" in batch_log(out, jid)


@pytest.mark.parametrize("script,job_name", [("pretrain.sbatch", "mae-pretrain"),
                                             ("finetune.sbatch", "mae-finetune")])
def test_rank_env_self_submit(cluster, tmp_path, script, job_name):
    """`bash launch/slurm/X.sbatch` outside a job submits itself, turning env variables into sbatch options."""
    out = tmp_path / "run"
    out.mkdir()
    env = job_env(out, TRAIN_SCRIPT=PRINT_ENV, GPUS_PER_NODE="0", TASKS_PER_NODE="2", CPUS_PER_TASK="1",
                  TIME="5", SBATCH_ARGS=f"--output={out}/slurm-%j.out", EXTRA="b.c=2")
    r = cluster.run(["bash", f"launch/slurm/{script}", "a.b=1"], env=env, cwd=ROOT)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    assert m, (r.stdout, r.stderr)
    assert "--gres=none --ntasks-per-node=2 --cpus-per-task=1 --time=5" in r.stderr, r.stderr
    _check_rank_env(cluster, out, int(m.group(1)), job_name, ["a.b=1", "b.c=2"])


@pytest.mark.parametrize("from_elsewhere", [False, True], ids=["from_repo_root", "from_elsewhere"])
def test_rank_env_plain_sbatch(cluster, tmp_path, from_elsewhere):
    """`sbatch [options] launch/slurm/pretrain.sbatch overrides...`: options override the #SBATCH lines.
    Submitted from another folder, the script finds the repository through the job's Command path."""
    out = tmp_path / "run"
    jid = submit(cluster, "pretrain.sbatch", out, "x.y=3", env={"TRAIN_SCRIPT": PRINT_ENV},
                 cwd=tmp_path if from_elsewhere else ROOT)
    _check_rank_env(cluster, out, jid, "mae-pretrain", ["x.y=3"])
    assert f"repo_dir={ROOT}" in (out / "run_info" / f"job_{jid}.txt").read_text()


# ------------------------------------------------------------------------ deepspeed launcher per node
def test_deepspeed_per_node_requeue(cluster, tmp_path):
    out = tmp_path / "ds"
    steps = 60
    jid = submit(cluster, "deepspeed_per_node.sbatch", out, f"train.steps={steps}", "fake.step_seconds=0.2",
                 env={"TRAIN_SCRIPT": FAKE, "GPUS_PER_NODE": "2"},
                 sbatch_args=["--ntasks-per-node=1", "--cpus-per-task=2", "--gres=none", "--time=10"])
    node_log = out / "logs" / f"job{jid}_node0.log"
    wait_for(lambda: node_log.exists() and len(fake_steps(node_log.read_text())) >= 10, 90,
             "10 steps in the deepspeed node log")
    cluster.run(["scancel", "--signal=USR1", str(jid)])
    info = assert_completed(cluster, out, jid, timeout=120)
    text = node_log.read_text()
    assert info["Restarts"] == "1", describe(cluster, out, jid)
    assert (out / "run_info" / "exit_codes" / f"job{jid}_restart0" / "node0").read_text().strip() == "75"
    assert (out / "run_info" / f"hostfile_job{jid}").read_text().split() == [cluster.host, "slots=2"]
    assert "preempted: checkpoint at step" in text
    assert "--node_rank=0" in text and "resumed from step" in text
    for rank in (0, 1):  # every step exactly once over both runs, on each rank
        assert fake_steps(text, rank) == list(range(1, steps + 1)), describe(cluster, out, jid)
    assert json.loads((out / "final.json").read_text())["step"] == steps


# ------------------------------------------------------------------------------- the real pretrain.py
def _pretrain_available() -> str | None:
    try:
        import mae_curriculum.cli.pretrain  # noqa: F401
        import mae_curriculum.engine.pretrain  # noqa: F401
    except ImportError as e:
        return f"pretrain.py is not importable yet: {e}"
    return None


def test_pretrain_preempt_requeue_resume(cluster, tmp_path, demo_data):
    reason = _pretrain_available()
    if reason:
        pytest.skip(reason)
    from conftest import TINY

    overrides = [*TINY, f"data.train_shards={demo_data / 'train'}", f"data.val_shards={demo_data / 'val'}",
                 "train.epochs=6", "curriculum.schedule=constant", "checkpoint.every_steps=5",
                 "checkpoint.every_epochs=0"]
    # uninterrupted reference run
    ref = tmp_path / "ref"
    jid0 = submit(cluster, "pretrain.sbatch", ref, *overrides)
    assert_completed(cluster, ref, jid0, timeout=240)
    ref_final = json.loads((ref / "final.json").read_text())

    out = tmp_path / "pre"
    jid = submit(cluster, "pretrain.sbatch", out, *overrides)
    wait_for(lambda: list((out / "checkpoints").glob("step*/complete.json")), 180,
             "a first checkpoint (mid-run)")
    cluster.run(["scancel", "--signal=USR1", str(jid)])
    info = assert_completed(cluster, out, jid, timeout=240)
    assert info["Restarts"] == "1", describe(cluster, out, jid)
    rc0 = sorted(p.read_text().strip() for p in (out / "run_info" / "exit_codes" / f"job{jid}_restart0").iterdir())
    assert rc0 == ["75", "75"], rc0
    log0 = (out / "logs" / f"job{jid}_0.log").read_text(errors="replace")
    saved = re.findall(r"saving a checkpoint at step (\d+)", log0)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", log0)
    assert saved and resumed and saved[-1] == resumed[-1], describe(cluster, out, jid)
    assert "restart 1" in log0 and "restart 1" in (out / "run_info" / f"job_{jid}.txt").read_text()
    final = json.loads((out / "final.json").read_text())
    assert {k: final[k] for k in ("step", "samples", "epoch")} == \
        {k: ref_final[k] for k in ("step", "samples", "epoch")}, (final, ref_final)


# ------------------------------------------------------------------------------- time limit (checked last)
def test_time_limit_signal_requeues_and_resumes(cluster, time_limit_job):
    jid, out = time_limit_job
    info = assert_completed(cluster, out, jid, timeout=240)
    restarts = int(info["Restarts"])
    assert restarts >= 1, describe(cluster, out, jid)
    log0 = (out / "logs" / f"job{jid}_0.log").read_text()
    assert log0.count("got signal SIGUSR1") >= restarts  # (one more may land on the very last step)
    for r in range(restarts):
        codes = [p.read_text().strip() for p in (out / "run_info" / "exit_codes" / f"job{jid}_restart{r}").iterdir()]
        assert codes == ["75", "75"], (r, codes)
    assert fake_steps(log0) == list(range(1, TL_STEPS + 1)), describe(cluster, out, jid)
    assert json.loads((out / "final.json").read_text())["step"] == TL_STEPS
    text = batch_log(out, jid)
    assert text.count("scontrol requeue") == restarts and text.rstrip().endswith("finished"), text


# ------------------------------------------------------------------------------------ launch/local.sh
def test_local_sh_relaunches_on_75(tmp_path):
    """launch/local.sh (no SLURM): ranks that exit 75 after a SIGUSR1 are relaunched and resume."""
    import signal
    import subprocess

    out = tmp_path / "local"
    steps = 50
    env = {**os.environ, **job_env(out), "NGPUS": "2", "TRAIN_SCRIPT": FAKE}
    env.pop("RANK", None)
    log = tmp_path / "local.log"
    with open(log, "wb") as f:
        p = subprocess.Popen(["bash", "launch/local.sh", f"train.steps={steps}", "fake.step_seconds=0.2"],
                             cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(fake_steps(log.read_text(errors="replace"))) >= 5, 120, "5 steps from local.sh")
        ranks = []
        for d in Path("/proc").iterdir():  # the 2 ranks this test started (their argv names our output dir)
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"output_dir={out}".encode() in argv and any(a.startswith(b"--local_rank") for a in argv):
                ranks.append(int(d.name))
        assert len(ranks) == 2, ranks
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
        rc = p.wait(timeout=150)
    finally:
        if p.poll() is None:  # local.sh passes SIGTERM on to the launcher's process group
            p.terminate()
            try:
                p.wait(timeout=45)
            except subprocess.TimeoutExpired:
                p.kill()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "restart 1:" in text and "resuming" in text and text.rstrip().endswith("finished"), text[-3000:]
    for rank in (0, 1):
        assert fake_steps(text, rank) == list(range(1, steps + 1)), text[-3000:]
    assert json.loads((out / "final.json").read_text())["step"] == steps
