"""A real one-node SLURM cluster (Debian's slurm-wlm + munge) for tests.

``OneNodeCluster`` writes a minimal slurm.conf into a private temporary directory, starts
its own ``munged`` (own socket and key copy), ``slurmctld`` and ``slurmd`` in the foreground
as children of this process, waits until the node is idle, and on exit cancels every job,
stops the daemons and kills whatever is left of the jobs (found by the unique SLURM_CONF
path in their environment), so nothing keeps running after the ``with`` block.

Nothing global is touched except that ``.ci/install_slurm.sh`` may apt-get install the
packages: the daemons listen on free ports picked at start, and the client commands are
pointed at the cluster through ``SLURM_CONF`` in :attr:`OneNodeCluster.env`.

Usage::

    with OneNodeCluster() as c:
        jid = c.sbatch(["--wrap", "hostname"])
        info = c.wait_job(jid, timeout=60)
        assert info["JobState"] == "COMPLETED"

Run ``python -m tests.slurm.cluster`` for a timed smoke test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / ".ci" / "install_slurm.sh"
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# Job states in which a job will not change any more by itself.
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be run here (not root, or the packages cannot be installed)."""


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def ensure_installed(install: bool = True) -> None:
    """Make sure slurmctld/slurmd/munged/sbatch exist; raise ClusterUnavailable if not possible."""
    names = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo")
    if all(_which(n) for n in names):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("not root: cannot install or run slurmctld/slurmd/munged as root")
    if not install:
        raise ClusterUnavailable("slurm-wlm is not installed")
    r = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if r.returncode != 0 or not all(_which(n) for n in names):
        raise ClusterUnavailable(
            "cannot install slurm-wlm with apt-get (.ci/install_slurm.sh exit "
            f"{r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> dict[str, int]:
    """CPUs / sockets / cores / threads / memory as slurmd itself detects them (slurmd -C)."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True).stdout
    hw = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out)}
    if "CPUs" not in hw:
        hw["CPUs"] = os.cpu_count() or 1
    if "RealMemory" not in hw:
        mem = int(subprocess.run(["free", "-m"], capture_output=True, text=True).stdout.split("\n")[1].split()[1])
        hw["RealMemory"] = mem
    return hw


def parse_scontrol(text: str) -> dict[str, str]:
    """Parse ``scontrol show job -o`` style ``Key=Value`` output (values may not contain spaces)."""
    info: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            info.setdefault(k, v)
    return info


class OneNodeCluster:
    """Context manager running a private one-node SLURM cluster (must be root)."""

    def __init__(self, *, name: str = "maetest", install: bool = True, start_timeout: float = 60.0,
                 kill_wait: int = 5, cred_expire: int = 10, cpus: int | None = None,
                 keep_dir: bool = False, extra_conf: str = ""):
        self.name = name
        self.install = install
        self.start_timeout = start_timeout
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.want_cpus = cpus  # more than the machine has: declared with SlurmdParameters=config_overrides
        self.keep_dir = keep_dir
        self.extra_conf = extra_conf
        self.host = socket.gethostname().split(".")[0]
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.env: dict[str, str] = {}
        self.cpus = 1
        self.start_seconds = 0.0
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # ------------------------------------------------------------------ start
    def __enter__(self) -> "OneNodeCluster":
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise ClusterUnavailable("not root: slurmctld/slurmd/munged must run as root here")
        ensure_installed(self.install)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        d = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        os.chmod(d, 0o700)
        self.dir = d
        for sub in ("state", "spool", "log", "run", "munge"):
            (d / sub).mkdir(mode=0o700)
        # munge: private socket, a root-owned copy of the key (created if there is none)
        key = d / "munge" / "munge.key"
        system_key = Path("/etc/munge/munge.key")
        if system_key.exists():
            shutil.copyfile(system_key, key)
        else:
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.munge_socket = d / "munge" / "munge.socket"
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
            f"--seed-file={d / 'munge' / 'munged.seed'}",
        ])
        self._wait_for(lambda: self.munge_socket.exists(), 10, "munged socket")

        hw = _node_hardware()
        mem = max(256, hw["RealMemory"] - min(1024, hw["RealMemory"] // 8))
        topo = " ".join(f"{k}={hw[k]}" for k in ("SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore") if k in hw)
        overrides = ""
        self.cpus = hw["CPUs"]
        if self.want_cpus and self.want_cpus != hw["CPUs"]:
            # e.g. 4 slots on 2 cores, so that two 2-task jobs (mostly sleeping) can run side by side
            self.cpus = self.want_cpus
            topo = f"SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1"
            overrides = "SlurmdParameters=config_overrides"
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        self.conf = d / "slurm.conf"
        self.conf.write_text(f"""\
# written by tests/slurm/cluster.py
ClusterName={self.name}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}
SlurmdPidFile={d / 'run' / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait}
SlurmdTimeout=30
SlurmctldTimeout=30
MessageTimeout=10
InactiveLimit=0
MinJobAge=600
OverTimeLimit=0
Waittime=0
{overrides}
{self.extra_conf}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} {topo} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        for k in list(self.env):  # do not let an outer allocation leak into the test cluster
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and k != "SLURM_CONF":
                del self.env[k]
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for(self._node_idle, self.start_timeout, f"node {self.host} idle in sinfo")

    def _spawn(self, name: str, argv: Sequence[str | None]) -> None:
        assert self.dir is not None
        if argv[0] is None:
            raise ClusterUnavailable(f"{name} not found")
        log = open(self.dir / "log" / f"{name}.stdout", "wb")
        self._logs.append(log)
        env = dict(os.environ)
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        self._procs[name] = subprocess.Popen(
            [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env)

    def _wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n"
                                       + self.logs_tail())
            if pred():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.logs_tail())

    def _node_idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-n", self.host, "-o", "%T"], check=False, timeout=10)
        return r.returncode == 0 and r.stdout.strip().rstrip("*") == "idle"

    # --------------------------------------------------------------- helpers
    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None
            ) -> subprocess.CompletedProcess:
        """Run a SLURM client command (or anything else) against this cluster."""
        e = dict(self.env)
        if env:
            e.update(env)
        r = subprocess.run(list(argv), capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> int:
        r = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return parse_scontrol(r.stdout) if r.returncode == 0 else {}

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: int, states: set[str] | str, timeout: float = 60,
                   poll: float = 0.25) -> dict[str, str]:
        """Wait until the job is in one of ``states``; return its scontrol info."""
        if isinstance(states, str):
            states = {states}
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") in FINAL_STATES and not (states & FINAL_STATES):
                raise RuntimeError(f"job {job_id} ended as {info.get('JobState')} while waiting for "
                                   f"{sorted(states)}: {info}")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n"
                           + self.logs_tail())

    def wait_job(self, job_id: int, timeout: float = 120) -> dict[str, str]:
        """Wait until the job is in a final state; return its scontrol info."""
        return self.wait_state(job_id, FINAL_STATES, timeout)

    def logs_tail(self, n: int = 25) -> str:
        if self.dir is None:
            return ""
        parts = []
        for f in sorted((self.dir / "log").glob("*")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            if lines:
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------- stop
    def _leftover_pids(self) -> list[int]:
        """Processes (slurmstepd, job tasks) whose environment names this cluster's slurm.conf."""
        if self.conf is None:
            return []
        needle = f"SLURM_CONF={self.conf}".encode()
        me, pids = os.getpid(), []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == me:
                continue
            try:
                environ = (p / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.append(int(p.name))
        return pids

    def stop(self) -> None:
        """Cancel jobs, shut the daemons down and kill leftovers. Safe to call twice."""
        ctld = self._procs.get("slurmctld")
        if self.conf is not None and ctld is not None and ctld.poll() is None:
            try:
                self.run(["scancel", "--full", "--quiet", "-u", "root"], check=False, timeout=10)
                deadline = time.monotonic() + self.kill_wait + 10
                while time.monotonic() < deadline:
                    r = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                    if r.returncode != 0 or not r.stdout.strip():
                        break
                    time.sleep(0.3)
                self.run(["scontrol", "shutdown"], check=False, timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # daemons: slurmd/slurmctld (may already be going down), then munged last
        for name in ("slurmd", "slurmctld", "munged"):
            p = self._procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                try:
                    p.wait(timeout=5 if name != "munged" else 0.1)
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        # jobs and slurmstepd that outlived the daemons
        for attempt in range(20):
            left = self._leftover_pids()
            if not left:
                break
            sig = signal.SIGTERM if attempt < 3 else signal.SIGKILL
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.25)
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _smoke() -> None:
    t0 = time.monotonic()
    ensure_installed()
    t_inst = time.monotonic() - t0
    with OneNodeCluster(keep_dir=False) as c:
        print(f"install check {t_inst:.1f}s, cluster start {c.start_seconds:.1f}s, conf {c.conf}")
        t1 = time.monotonic()
        out = c.dir / "hostname.out"
        jid = c.sbatch(["--wrap", "hostname", "-o", str(out)])
        info = c.wait_job(jid, timeout=60)
        print(f"job {jid}: {info['JobState']} ExitCode={info['ExitCode']} in {time.monotonic() - t1:.1f}s; "
              f"output {out.read_text().strip()!r}")
    t2 = time.monotonic()
    print(f"total {t2 - t0:.1f}s")


if __name__ == "__main__":
    _smoke()
