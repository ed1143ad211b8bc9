"""A run without a launcher (one process) rendezvouses through a private file, not a TCP port:
concurrent single-process runs (eval, select, small jobs) cannot collide on MASTER_PORT's default."""
import socket

from conftest import check, data_overrides, run_trainer

CONFIG = "trainer/configs/demo.yaml"


def test_single_process_train_runs_while_the_default_port_is_taken(demo_data, tmp_path):
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 29500))
        holder.listen()
    except OSError:
        pass   # somebody else holds it: the same condition
    try:
        out, tmp = tmp_path / "run", tmp_path / "tmp"
        tmp.mkdir()
        check(run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, out), "max_steps=1",
                           "data.workers=0", "log.progress=false", "eval.every_steps=0", "data.val_shards="],
                          TMPDIR=str(tmp)))
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"
    finally:
        holder.close()
    assert list(tmp.glob("trainer-pg-*")) == []   # the rendezvous directory is removed at shutdown
