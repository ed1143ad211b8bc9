"""How loader workers start (``data.worker_start``, ``trainer.data.worker_loader``).

A rank is multi-threaded (gloo's or NCCL's threads, the training loader's queue feeders). On
CPython 3.11 a ``fork()`` that races a thread entering Python from C (which creates a thread state
under the interpreter's thread-list lock, without the GIL) leaves the child waiting forever for that
lock in ``PyOS_AfterFork_Child``: a training run hung so in its final evaluation. The default,
``forkserver``, forks the workers from one single-threaded server per process instead.

The hazard is reproduced here with a C thread (compiled with gcc, as DeepSpeed's ops are) that
calls a ctypes callback in a loop, each call creating and deleting a thread state. Measured on this
machine, a plain ``os.fork()`` loop beside it hung 5 times in 5 within 6 to 54 forks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer import data as D

CHURN_C = r"""
#include <pthread.h>
typedef int (*callback)(void);
static void *loop(void *cb) { for (;;) ((callback)cb)(); return 0; }
int start_churn(callback cb) { pthread_t t; return pthread_create(&t, 0, loop, (void *)cb); }
"""

# Evaluation passes over the validation shard, each forking fresh workers, beside the churning thread.
SCRIPT = r"""
import ctypes, json, sys, time
sys.path.insert(0, {root!r})
from trainer import data as D
lib = ctypes.CDLL({lib!r})
callback = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 0)
dec = D.SampleDecoder(D.load_tokenizer({tok!r}), 24, D.image_transforms(64, 1.0, train=False))
reference = [k for b in D.eval_batches([{url!r}], dec, 16, 0, 1) for k in b["keys"]]
assert lib.start_churn(callback) == 0
time.sleep(0.2)
passes = []
for _ in range({passes}):
    passes.append(sorted(k for b in D.eval_batches([{url!r}], dec, 16, 0, 1, workers=2, start={start!r})
                         for k in b["keys"]))
print(json.dumps({{"reference": sorted(reference), "passes": passes}}))
sys.stdout.flush()
import os; os._exit(0)   # the churning thread never ends
"""


@pytest.fixture(scope="module")
def churn_lib(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("churn")
    (d / "churn.c").write_text(CHURN_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(d / "libchurn.so"), str(d / "churn.c"), "-lpthread"],
                   check=True)
    return d / "libchurn.so"


@pytest.mark.full   # ~25-40 s (the churning thread takes the GIL); the fast tier checks that workers come from the server
def test_forkserver_workers_start_beside_a_thread_that_hangs_plain_forks(demo_data, churn_lib, tmp_path):
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    script = SCRIPT.format(root=str(Path(__file__).resolve().parents[1]), lib=str(churn_lib),
                           tok=str(demo_data / "tokenizer"), url=url, passes=20, start="forkserver")
    # 20 passes x 2 workers: 40 worker starts (with start="fork" the same script hung 5 runs in 5; module docstring).
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(got["reference"]) == 96 and len(got["passes"]) == 20
    assert all(p == got["reference"] for p in got["passes"])


def _mask(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


STOP = sum(1 << (s - 1) for s in D.STOP_SIGNALS)


class _WhoDecoder(D.SampleDecoder):
    """Batches that say which process forked the worker and whether the stop signals reach it."""

    def tokenize(self, texts):
        spared = (_mask("self", "SigBlk") | _mask("self", "SigIgn")) & STOP == STOP
        return {**super().tokenize(texts), "parent": os.getppid(), "spared": spared}


def test_the_loader_server_and_its_workers_outlive_slurms_stop_signals(demo_data):
    """SLURM signals every process of the step. The server must not die of it (its workers, whose
    parent it is, would exit under a rank that is checkpointing), and neither may the workers."""
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    dec = _WhoDecoder(D.load_tokenizer(str(demo_data / "tokenizer")), 24, D.image_transforms(64, 1.0, train=False))
    reference = sorted(k for b in D.eval_batches([url], dec, 8, 0, 1) for k in b["keys"])

    def one_pass():
        batches = list(D.eval_batches([url], dec, 8, 0, 1, workers=2, start="forkserver"))
        assert sorted(k for b in batches for k in b["keys"]) == reference and len(reference) == 96
        assert all(b["spared"] for b in batches)
        (parent,) = {b["parent"] for b in batches}
        return parent
    server = one_pass()
    assert server != os.getpid()   # forked by the server, not by this (threaded) process
    assert _mask(server, "SigBlk") & STOP == STOP
    assert _mask(os.getpid(), "SigBlk") & STOP == 0   # this process's own mask is as it was
    for sig in D.STOP_SIGNALS:
        os.kill(server, sig)
    assert one_pass() == server   # the same server, alive, starts the next pass's workers


KILLED_RANK = r"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
from trainer import data as D
if __name__ == "__main__":
    dec = D.SampleDecoder(D.load_tokenizer({tok!r}), 24, D.image_transforms(64, 1.0, train=False))
    it = D.eval_batches([{url!r}], dec, 4, 0, 1, workers=2, start="forkserver")
    next(it)
    print(" ".join(str(w.pid) for w in it._workers), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)   # as the OOM killer, or torchrun's second signal
"""


def test_the_workers_and_their_server_end_with_a_rank_killed_outright(demo_data, tmp_path):
    """The workers are the server's children, so torch's parent-changed watchdog cannot see the rank
    die; left running they would hold the job's output pipes open (a launcher reading them waits
    for ever). They watch the rank themselves, and the server ends with its last worker."""
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    script = tmp_path / "rank.py"
    script.write_text(KILLED_RANK.format(root=str(Path(__file__).resolve().parents[1]),
                                         tok=str(demo_data / "tokenizer"), url=url))
    # communicate() returns only when every holder of the pipes (server, workers) is gone.
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err[-2000:]
    workers = [int(p) for p in out.split()]
    assert len(workers) == 2
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_an_unknown_worker_start_is_a_config_error(demo_data):
    (url,) = D.expand_shards(str(demo_data / "val"), "k")
    dec = D.SampleDecoder(D.load_tokenizer(str(demo_data / "tokenizer")), 24, D.image_transforms(64, 1.0, train=False))
    with pytest.raises(D.ConfigError, match="data.worker_start.*forkserver, spawn, fork.*'threads'"):
        next(D.eval_batches([url], dec, 8, 0, 1, workers=1, start="threads"))
