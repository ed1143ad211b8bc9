"""The rendezvous port (``MASTER_PORT``) of a SLURM job: outside the ephemeral range, free on this host.

The kernel hands out local ports for outgoing connections from its ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 by default). A rendezvous port inside
that range can already be held by any outgoing connection on the master node (e.g. a previous
job's store clients), and the TCPStore server then fails with EADDRINUSE. So the port is derived
from the job id in a span outside that range:

* 20000-29999 when the host's ephemeral range leaves it alone (it does for the Linux default and
  for 49152-65535): above the low ports most services listen on, below the ephemeral range and
  below Kubernetes' NodePort range (30000-32767). The same job id gives the same port on every
  such host, so ranks that derive it independently (``srun`` without ``sbatch``) agree.
* otherwise the ports in 20000-65535 outside the ephemeral range (or, if fewer than 1000 are
  left there, in 1025-65535 outside it).

Attempt ``k`` of a job steps through the span by a stride prime to its length, so attempts give
distinct ports and consecutive job ids distinct ports. :func:`find_free_port` returns the first
attempt whose port can be bound on this host now (a listening socket or a connection holding it
is skipped). ``slurm/train.sbatch`` runs it on the batch host, which is the allocation's first
node (``MASTER_ADDR``), and exports the result to every rank through ``srun``'s environment.

Standard library only (no torch), so that ``python -m trainer.ports --job ID`` is quick::

    python -m trainer.ports --job 123456               # first free port for job 123456
    python -m trainer.ports --job 123456 --attempt 0   # the attempt-0 port, without checking it
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import sys
from typing import Callable, Iterable

RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default, used where RANGE_FILE cannot be read
PREFERRED = (20000, 29999)          # the span used whenever it lies outside the ephemeral range
FLOOR = 20000                       # otherwise prefer ports at or above this ...
MIN_SPAN = 1000                     # ... while at least this many are left there
LOWEST = 1025                       # never a privileged port
HIGHEST = 65535
STRIDE = 7919                       # between attempts (a prime; adjusted to be prime to the span)
MAX_ATTEMPTS = 64

Span = tuple[int, int]  # inclusive


class NoFreePort(RuntimeError):
    pass


def ephemeral_range(path: str = RANGE_FILE) -> Span:
    """The kernel's ephemeral port range ``(low, high)``; Linux's default where it cannot be read."""
    try:
        with open(path) as fh:
            lo, hi = (int(x) for x in fh.read().split()[:2])
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    if not 0 < lo <= hi <= HIGHEST:
        return DEFAULT_EPHEMERAL
    return lo, hi


def _outside(ephemeral: Span, lowest: int) -> list[Span]:
    lo, hi = ephemeral
    spans = [(lowest, min(lo - 1, HIGHEST)), (max(hi + 1, lowest), HIGHEST)]
    return [(a, b) for a, b in spans if a <= b]


def _size(spans: Iterable[Span]) -> int:
    return sum(b - a + 1 for a, b in spans)


def candidate_spans(ephemeral: Span | None = None) -> list[Span]:
    """The port spans the derivation draws from, for the given (default: this host's) ephemeral range.

    Empty only in the degenerate case of an ephemeral range covering 1025-65535, where every port
    is ephemeral; :func:`derive_port` then falls back to 20000-65535.
    """
    lo, hi = ephemeral or ephemeral_range()
    if hi < PREFERRED[0] or lo > PREFERRED[1]:
        return [PREFERRED]
    spans = _outside((lo, hi), FLOOR)
    if _size(spans) >= MIN_SPAN:
        return spans
    return _outside((lo, hi), LOWEST)


def _stride(n: int) -> int:
    s = STRIDE % n or 1
    while math.gcd(s, n) != 1:
        s += 1
    return s


def derive_port(job: int, attempt: int = 0, ephemeral: Span | None = None) -> int:
    """Port number ``attempt`` for SLURM job ``job``: deterministic, outside the ephemeral range, > 1024.

    Consecutive job ids get consecutive positions in the span (distinct ports for up to the span's
    length of them, 10000 by default); attempts step by a stride prime to that length.
    """
    spans = candidate_spans(ephemeral) or [(FLOOR, HIGHEST)]
    n = _size(spans)
    i = (int(job) + int(attempt) * _stride(n)) % n
    for a, b in spans:
        if i <= b - a:
            return a + i
        i -= b - a + 1
    raise AssertionError("unreachable")


def _families() -> list[tuple[int, str]]:
    fams = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        fams.append((socket.AF_INET6, "::"))
    return fams


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` on every address of this host now.

    Binds and listens the way torch's TCPStore server does (wildcard address, ``SO_REUSEADDR``,
    IPv6 dual-stack where the host has IPv6), so a port in TIME_WAIT counts as free and one held by
    a listening socket or an outgoing connection does not.
    """
    for family, addr in _families():
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no such address family on this host
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((addr, port))
            s.listen(1)
        except OSError as err:
            if family == socket.AF_INET6 and err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # IPv6 present in Python but not configured on the host
            return False
        finally:
            s.close()
    return True


def find_free_port(job: int, max_attempts: int = MAX_ATTEMPTS, ephemeral: Span | None = None,
                   is_free: Callable[[int], bool] = port_is_free,
                   on_busy: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """``(port, attempt)``: the first of ``derive_port(job, 0), derive_port(job, 1), ...`` that is free here.

    ``on_busy(port, attempt)`` is called for each port skipped. Raises :class:`NoFreePort` after
    ``max_attempts`` busy ports.
    """
    ephemeral = ephemeral or ephemeral_range()
    for attempt in range(max_attempts):
        port = derive_port(job, attempt, ephemeral)
        if is_free(port):
            return port, attempt
        if on_busy is not None:
            on_busy(port, attempt)
    raise NoFreePort(f"none of the {max_attempts} rendezvous ports derived for job {job} is free on "
                     f"{socket.gethostname()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.ports", description=__doc__.split("\n\n")[0])
    p.add_argument("--job", type=int, default=None, help="SLURM job id (default: $SLURM_JOB_ID)")
    p.add_argument("--attempt", type=int, default=None,
                   help="print this attempt's port without checking that it is free")
    p.add_argument("--max-attempts", type=int, default=MAX_ATTEMPTS)
    args = p.parse_args(argv)
    job = args.job
    if job is None:
        try:
            job = int(os.environ["SLURM_JOB_ID"])
        except (KeyError, ValueError):
            p.error("--job is required outside a SLURM job")
    if args.attempt is not None:
        print(derive_port(job, args.attempt))
        return 0
    host = socket.gethostname()

    def busy(port: int, attempt: int) -> None:
        print(f"trainer.ports: port {port} (job {job}, attempt {attempt}) is in use on {host}; trying the next",
              file=sys.stderr)

    try:
        port, _ = find_free_port(job, args.max_attempts, on_busy=busy)
    except NoFreePort as err:
        print(f"trainer.ports: error: {err}", file=sys.stderr)
        return 1
    print(port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
