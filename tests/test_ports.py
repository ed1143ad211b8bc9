"""trainer/ports.py: the SLURM rendezvous port lies outside the ephemeral range and skips busy ports."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import ports

ROOT = Path(__file__).resolve().parent.parent
HUGE_JOB_IDS = [2**31 - 1, 2**32 + 7, 10**12 + 3, 2**63 - 1, 123456789012345678901234567890]
# (low, high) ephemeral ranges seen in the wild or made up to corner the derivation
SYNTHETIC_RANGES = [(32768, 60999), (32768, 61000), (49152, 65535), (1024, 4999), (10000, 20000),
                    (15000, 65000), (20000, 29999), (25000, 26000), (1025, 50000), (1025, 64000),
                    (30000, 65535), (19999, 30000)]


def _outside(port: int, rng: tuple[int, int]) -> bool:
    return 1024 < port <= 65535 and not rng[0] <= port <= rng[1]


def test_ephemeral_range_is_read_from_proc_with_a_fallback(tmp_path):
    (tmp_path / "range").write_text("10000\t20000\n")
    assert ports.ephemeral_range(str(tmp_path / "range")) == (10000, 20000)
    assert ports.ephemeral_range(str(tmp_path / "missing")) == ports.DEFAULT_EPHEMERAL == (32768, 60999)
    (tmp_path / "junk").write_text("not numbers")
    assert ports.ephemeral_range(str(tmp_path / "junk")) == ports.DEFAULT_EPHEMERAL
    (tmp_path / "reversed").write_text("40000 30000")
    assert ports.ephemeral_range(str(tmp_path / "reversed")) == ports.DEFAULT_EPHEMERAL
    if Path(ports.RANGE_FILE).is_file():
        want = tuple(int(x) for x in Path(ports.RANGE_FILE).read_text().split())
        assert ports.ephemeral_range() == want


def test_every_job_id_derives_a_port_outside_this_hosts_ephemeral_range():
    rng = ports.ephemeral_range()
    spans = ports.candidate_spans(rng)
    n = sum(b - a + 1 for a, b in spans)
    for attempt in range(3):
        got = [ports.derive_port(job, attempt, rng) for job in range(200_001)]
        bad = [(job, p) for job, p in enumerate(got) if not _outside(p, rng)]
        assert not bad, (rng, attempt, bad[:5])
        # consecutive job ids get distinct ports (as many as the span holds)
        assert len(set(got[:n])) == min(n, len(got))
    for job in HUGE_JOB_IDS:
        assert all(_outside(ports.derive_port(job, a), rng) for a in range(ports.MAX_ATTEMPTS))
    # the default derivation when the range leaves 20000-29999 alone (the Linux default does)
    if rng[0] > 29999 or rng[1] < 20000:
        assert ports.derive_port(123456) == 23456 and ports.derive_port(29999) == 29999


@pytest.mark.parametrize("rng", SYNTHETIC_RANGES, ids=[f"{a}-{b}" for a, b in SYNTHETIC_RANGES])
def test_derived_ports_avoid_synthetic_ephemeral_ranges(rng):
    for attempt in (0, 1, 5):
        bad = [job for job in range(0, 200_001, 7) if not _outside(ports.derive_port(job, attempt, rng), rng)]
        assert not bad, bad[:5]
    for job in HUGE_JOB_IDS:
        assert all(_outside(ports.derive_port(job, a, rng), rng) for a in range(ports.MAX_ATTEMPTS))
    # attempts of one job are distinct ports
    assert len({ports.derive_port(4242, a, rng) for a in range(ports.MAX_ATTEMPTS)}) == ports.MAX_ATTEMPTS


def test_ephemeral_range_covering_everything_still_gives_a_valid_port():
    for rng in [(1024, 65535), (1, 65535), (1025, 65535)]:
        assert ports.candidate_spans(rng) == []
        assert all(20000 <= ports.derive_port(job, a, rng) <= 65535 for job in range(0, 100_000, 97) for a in (0, 1))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, port))
    s.listen(1)
    return s


def _free_job(start: int = 1000) -> int:
    """A job id whose first two derived ports are free now (so the test does not depend on the host)."""
    for job in range(start, start + 500):
        if ports.port_is_free(ports.derive_port(job, 0)) and ports.port_is_free(ports.derive_port(job, 1)):
            return job
    raise AssertionError("no job id with free ports")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::"])
def test_a_port_held_by_a_listening_socket_is_skipped(host):
    job = _free_job()
    first, second = ports.derive_port(job, 0), ports.derive_port(job, 1)
    assert ports.find_free_port(job) == (first, 0)
    skipped = []
    try:
        holder = _listen(host, first)
    except OSError as err:
        pytest.skip(f"cannot listen on [{host}]:{first}: {err}")
    with holder:
        assert not ports.port_is_free(first)
        assert ports.find_free_port(job, on_busy=lambda p, a: skipped.append((p, a))) == (second, 1)
    assert skipped == [(first, 0)]
    assert ports.find_free_port(job) == (first, 0)  # free again once closed


def test_a_port_held_by_an_outgoing_connection_is_skipped():
    """What broke `make test`: a client socket's local port (here bound explicitly) blocks the server's bind."""
    job = _free_job(5000)
    first = ports.derive_port(job, 0)
    with _listen("127.0.0.1", 0) as server, socket.socket() as client:
        client.bind(("127.0.0.1", first))
        client.connect(server.getsockname())
        conn, _ = server.accept()
        with conn:
            assert not ports.port_is_free(first)
            assert ports.find_free_port(job)[1] >= 1


def test_no_free_port_raises():
    with pytest.raises(ports.NoFreePort):
        ports.find_free_port(7, max_attempts=3, is_free=lambda p: False)


def test_cli_prints_the_free_port_without_importing_torch():
    job = _free_job(9000)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "trainer.ports", "--job", str(job)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=60, check=True)
    assert p.stdout.strip() == str(ports.derive_port(job, 0)) and p.stderr == ""
    p = subprocess.run([sys.executable, "-m", "trainer.ports", "--attempt", "2"], capture_output=True, text=True,
                       cwd=ROOT, env={**env, "SLURM_JOB_ID": str(job)}, timeout=60, check=True)
    assert p.stdout.strip() == str(ports.derive_port(job, 2))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer.ports", "--job", "1", "--attempt", "0"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=True)
    assert not any(line.split("|")[-1].strip().startswith("torch") for line in p.stderr.splitlines())


def test_cli_reports_a_busy_port_on_stderr():
    job = _free_job(12000)
    first = ports.derive_port(job, 0)
    with _listen("127.0.0.1", first):
        p = subprocess.run([sys.executable, "-m", "trainer.ports", "--job", str(job)], capture_output=True, text=True,
                           cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout=60, check=True)
    assert p.stdout.strip() == str(ports.derive_port(job, 1))
    assert f"port {first} (job {job}, attempt 0) is in use" in p.stderr


def test_launch_env_under_srun_derives_attempt_0(monkeypatch):
    """`srun python -m trainer ...` without train.sbatch: every rank derives the same port; MASTER_PORT wins."""
    from trainer.dist import launch_env

    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "987654")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    le = launch_env()
    assert le.launcher == "slurm" and le.master_port == ports.derive_port(987654, 0)
    monkeypatch.setenv("MASTER_PORT", "31337")
    assert launch_env().master_port == 31337
