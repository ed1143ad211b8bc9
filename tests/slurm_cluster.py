"""A real, throw-away SLURM cluster on loopback, for tests.

``SlurmCluster(root).start()`` runs its own ``munged`` (own key and socket),
one ``slurmctld`` and two ``slurmd`` daemons that pose as the nodes ``node1``
and ``node2`` of one partition, all on 127.0.0.1 with free ports picked at
start, with every state, spool, log and pid file under ``root``.  ``stop()``
cancels the jobs, shuts the daemons down and then kills, by pid, whatever is
left of what this object started: the daemons themselves and every process
whose environment carries this cluster's marker (job steps and their tasks).
Nothing else on the machine is touched.

Needs Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm
munge``) and root (slurmd must run as root to launch jobs).  Call
``skip_or_fail_without_cluster()`` in a test or fixture to skip where they are
absent, or to fail there when ``TRAINER_REQUIRE_SLURM=1`` (CI sets it: a CI
machine that cannot run the SLURM tests is broken, not exempt).

Job ids start at a random ``FirstJobId``, so that successive test sessions
derive different rendezvous ports from them (``trainer/ports.py``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REQUIRE_ENV = "TRAINER_REQUIRE_SLURM"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel", "squeue")
INSTALL_HINT = "install them with `apt-get install -y slurm-wlm munge` (Debian/Ubuntu; needs root)"
MARKER = "CLIP_TEST_SLURM_CLUSTER"

# Final states of a job (scontrol's JobState).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


# Searched after PATH: the daemons live in sbin, which a non-root PATH often lacks.
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in SBIN_DIRS if (p := Path(d) / name).exists()), None
    )


def missing_requirements() -> str | None:
    """A reason to skip, or None when a test cluster can be started here."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return f"SLURM/munge binaries not found ({', '.join(missing)}); {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd launches jobs as root here)"
    return None


def slurm_required() -> bool:
    """Whether the SLURM tests must run here (``TRAINER_REQUIRE_SLURM`` set to anything but 0/false/no)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_without_cluster() -> None:
    """In a test or fixture: skip where no test cluster can start; fail instead under TRAINER_REQUIRE_SLURM=1."""
    reason = missing_requirements()
    if not reason:
        return
    import pytest

    if slurm_required():
        pytest.fail(f"{reason}. {REQUIRE_ENV}=1 is set, so the SLURM tests fail here instead of skipping",
                    pytrace=False)
    pytest.skip(reason)


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM if the test process dies without tearing down."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports for the daemons, free now, outside the kernel's ephemeral range.

    A port taken from ``bind(0)`` lies inside the ephemeral range, where any outgoing connection
    (a torchrun store client, another test's cluster) can take it between the check and the
    daemon's bind; ports outside that range are never handed out implicitly, and a random start
    keeps two clusters started at once (two test runs) apart. trainer/ports.py draws the span."""
    from trainer.ports import derive_port, ephemeral_range, port_is_free

    rng, ports = ephemeral_range(), []
    job = random.randrange(1 << 30)
    for attempt in range(512):
        port = derive_port(job, attempt, rng)
        if port not in ports and port_is_free(port):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports outside the ephemeral range {rng}")


def _budget(seconds: float) -> float:
    """What is left of the running test's pytest timeout (tests/conftest.py), so a wait fails with
    the daemons' logs before pytest-timeout kills the test."""
    try:
        from conftest import budget
    except ImportError:   # used outside pytest
        return seconds
    return budget(seconds)


def _proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def processes_with_env(**match: str) -> list[int]:
    """Pids of processes whose environment has all of ``match`` (key=value)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        env = _proc_env(int(d.name))
        if env and all(env.get(k) == v for k, v in match.items()):
            pids.append(int(d.name))
    return pids


def parse_scontrol_record(text: str) -> dict[str, str]:
    """Parse one ``scontrol show -o`` record (``Key=Value Key=Value ...``)."""
    out: dict[str, str] = {}
    # Values may contain spaces only in a few fields (e.g. Command with args is not
    # split by -o); keys are CamelCase words followed by '='.
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)", text.strip()):
        out[m.group(1)] = m.group(2)
    return out


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, root: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 1,
                 real_memory_mb: int = 8000, cred_expire_s: int = 5):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.cred_expire_s = cred_expire_s
        self.conf = self.root / "etc" / "slurm.conf"
        self.logdir = self.root / "log"
        self.marker = f"{self.root}:{os.getpid()}:{random.randrange(1 << 30)}"
        self.first_job_id = random.randrange(3000, 9000) * 10 + 1
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.started = False

    # ------------------------------------------------------------------ env
    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, srun, ...) and the jobs they submit."""
        env = dict(os.environ)
        # Never let a rank/world from the calling process leak into the jobs.
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TRAINER_MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
            env.pop(k, None)
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                env.pop(k)
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = self.marker
        return env

    # ---------------------------------------------------------------- start
    def _write_conf(self) -> None:
        for d in ("etc", "state", "log", "run", "munge", "tmp", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.ctld_port, self.node_ports = ctld_port, node_ports
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            f"ClusterName=cliptest{random.randrange(10**6)}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"TmpFS={r}/tmp",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            # Look at pending jobs (dependencies, begin times of requeued jobs) every second.
            "SchedulerParameters=sched_interval=1,sched_min_interval=100000,bf_interval=1",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=10",
            "MinJobAge=3600",
            "Waittime=0",
            "MessageTimeout=20",
            "JobRequeue=1",
            f"FirstJobId={self.first_job_id}",
            "PropagateResourceLimitsExcept=MEMLOCK",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.logdir / f"{name}.stdout", "ab")
        self._logs.append(log)
        env = dict(self.env)
        self._procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise SlurmError(f"{name} exited with status {p.returncode}; logs:\n{self.logs_tail()}")

    def start(self, timeout: float = 90) -> "SlurmCluster":
        missing = missing_requirements()
        if missing:
            raise SlurmError(missing)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self._daemon("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
            f"--pid-file={m}/munged.pid", f"--log-file={self.logdir}/munged.log", f"--seed-file={m}/seed",
            "--num-threads=2",
        ])
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged socket")
        self.started = True
        try:
            self._daemon("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") >= 1, 30,
                       "slurmctld to answer ping")
            for n in self.nodes:
                self._daemon(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, "all nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if cond():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout}s waiting for {what}; logs:\n{self.logs_tail()}")

    # ----------------------------------------------------------------- stop
    def stop(self) -> None:
        if not self._procs:
            return
        try:
            if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
                self.run(["scancel", "--full", "--signal=KILL", "--user", "root"], check=False, timeout=15)
                self.run(["scancel", "--user", "root"], check=False, timeout=15)
                self.run(["scontrol", "shutdown"], check=False, timeout=15)
        except Exception:
            pass
        deadline = time.monotonic() + 15
        for name in [n for n in self._procs if n != "munged"]:
            p = self._procs[name]
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        # Job steps (slurmstepd) and tasks outlive slurmd: end those that carry our marker.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = processes_with_env(**{MARKER: self.marker})
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(1.0)
        p = self._procs.get("munged")
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()
        self._procs.clear()
        self._logs.clear()
        self.started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -------------------------------------------------------------- clients
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        e = self.env
        if env:
            e.update(env)
        p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, argv))} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> int:
        p = self.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def job(self, jobid: int | str) -> dict[str, str]:
        p = self.run(["scontrol", "show", "job", "-o", str(jobid)], check=False)
        if p.returncode != 0 or not p.stdout.strip():
            return {}
        return parse_scontrol_record(p.stdout.splitlines()[0])

    def jobs(self, jobid: int | str) -> list[dict[str, str]]:
        """All records of a job (one per array task)."""
        p = self.run(["scontrol", "show", "job", "-o", str(jobid)], check=False)
        return [parse_scontrol_record(line) for line in p.stdout.splitlines() if line.strip()]

    def state(self, jobid: int | str) -> str:
        return self.job(jobid).get("JobState", "UNKNOWN")

    def wait_state(self, jobid: int | str, states, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job's state is one of ``states``; returns its record."""
        states = {states} if isinstance(states, str) else set(states)
        timeout = _budget(timeout)
        deadline = time.monotonic() + timeout
        rec: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            rec = self.job(jobid)
            if rec.get("JobState") in states:
                return rec
            time.sleep(poll)
        raise SlurmError(
            f"job {jobid} not in {sorted(states)} after {timeout}s: state {rec.get('JobState')} "
            f"reason {rec.get('Reason')}\n{self.logs_tail()}"
        )

    def wait_done(self, jobid: int | str, timeout: float) -> dict[str, str]:
        return self.wait_state(jobid, FINAL_STATES, timeout)

    def logs_tail(self, n: int = 30) -> str:
        out = []
        for f in sorted(self.logdir.glob("*.log")) + sorted(self.logdir.glob("*.stdout")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"==> {f.name} <==\n" + "\n".join(lines))
        return "\n".join(out)
