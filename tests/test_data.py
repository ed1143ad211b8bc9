"""The WebDataset pipeline: shard resolution, exact resume, corrupt data, manifests, eval split."""
from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from trainer import data as D
from trainer.config import ConfigError, load_config
from trainer.train import TrainData


def make_cfg(demo_data: Path, *extra):
    return load_config("trainer/configs/demo.yaml", [
        f"data.train_shards={demo_data}/train", "data.batch_size=8", "data.workers=2", "data.shuffle_buffer=32",
        "data.train_num_samples=80", "model.context_length=24", *extra])


def decoder(demo_data: Path, train=True):
    tok = D.load_tokenizer(str(demo_data / "tokenizer"))
    return D.SampleDecoder(tok, 24, D.build_transforms(64, [0.5] * 3, [0.5] * 3, 0.5, train=train))


def take(td: TrainData, n: int) -> list[dict]:
    return [td.next() for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["image"], b["image"])
            and torch.equal(a["input_ids"], b["input_ids"]))


def test_expand_shards_forms(demo_data):
    train = sorted(str(p) for p in (demo_data / "train").glob("*.tar"))
    assert D.expand_shards(str(demo_data / "train"), "k") == train
    assert D.expand_shards(f"{demo_data}/train/train-{{000000..000001}}.tar", "k") == train[:2]
    assert D.expand_shards([train[0], str(demo_data / "val")], "k")[0] == train[0]
    assert D.expand_shards("pipe:cat /x/y-{0..2}.tar", "k") == [f"pipe:cat /x/y-{i}.tar" for i in range(3)]
    with pytest.raises(ConfigError, match="config key 'data.train_shards': no shard matches '/nope/a-1.tar'"):
        D.expand_shards("/nope/a-{1..2}.tar", "data.train_shards")
    with pytest.raises(ConfigError, match="holds no \\*.tar shard"):
        D.expand_shards(str(demo_data / "tokenizer"), "k")


def test_resume_mid_epoch_and_across_epochs_reproduces_the_stream(demo_data):
    """Batches after a restart at micro-batch k == batches k+1.. of the uninterrupted stream.
    80 samples / (8 * 2 ranks) = 5 micro-batches per epoch, so 13 batches cross two epochs."""
    cfg, dec = make_cfg(demo_data), decoder(demo_data)
    full = take(TrainData(cfg, dec, rank=1, world=2, position=None), 13)
    for k in (3, 5, 7):  # odd k: the restarted loader must start at the second worker
        first = TrainData(cfg, dec, rank=1, world=2, position=None)
        take(first, k)
        import copy
        resumed = TrainData(cfg, dec, rank=1, world=2, position=copy.deepcopy(first.position))
        rest = take(resumed, 13 - k)
        assert all(same(a, b) for a, b in zip(full[k:], rest)), k
    assert full[0]["keys"] != full[5]["keys"]  # a new epoch reshuffles
    other_rank = take(TrainData(cfg, dec, rank=0, world=2, position=None), 1)[0]
    assert other_rank["keys"] != full[0]["keys"]


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_corrupt_samples_and_unreadable_shards_are_skipped_and_counted(demo_data, tmp_path, caplog):
    bad_dir = tmp_path / "train"
    bad_dir.mkdir()
    shutil.copy(demo_data / "train" / "train-000000.tar", bad_dir)  # one good shard, two bad ones
    (bad_dir / "zz-garbage.tar").write_bytes(b"\x00not a tar file" * 1000)
    _write_tar(bad_dir / "zz-badjpg.tar", {f"bad{i}.jpg": b"\xff\xd8 broken jpeg" for i in range(4)}
               | {f"bad{i}.txt": b"a red circle" for i in range(4)} | {f"bad{i}.json": b"{}" for i in range(4)})
    cfg = make_cfg(demo_data, f"data.train_shards={bad_dir}", "data.workers=0", "data.train_num_samples=100000")
    td = TrainData(cfg, decoder(demo_data), rank=0, world=1, position=None)
    with caplog.at_level("WARNING", logger="trainer.data"):
        batches = take(td, 40)
    assert all(not any(k.startswith("bad") for k in b["keys"]) for b in batches)
    assert td.skipped_local() > 0 and td.skipped_local() == batches[-1]["skipped"]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("corrupt sample" in w for w in warnings) == 1  # logged once, then only counted
    assert sum("zz-garbage.tar" in w for w in warnings) == 1
    assert td.skipped_local() > 4  # the garbage shard was drawn more than once, and 4 bad jpgs


def test_resume_counts_each_corrupt_sample_once(demo_data, tmp_path):
    """The replay after a restart meets the interrupted run's unreadable shards again; the skipped
    count must continue from the saved one, not add the replay's errors to it."""
    import copy

    bad_dir = tmp_path / "train"
    bad_dir.mkdir()
    for shard in sorted((demo_data / "train").glob("*.tar"))[:2]:
        shutil.copy(shard, bad_dir)
    for i in range(6):  # garbage is drawn often, before and after the restart point
        (bad_dir / f"zz-garbage{i}.tar").write_bytes(b"\x17not a tar file" * 1000)
    cfg = make_cfg(demo_data, f"data.train_shards={bad_dir}", "data.workers=2", "data.train_num_samples=100000")
    dec = decoder(demo_data)

    def counts(td, n):
        out = []
        for _ in range(n):
            td.next()
            out.append(td.skipped_local())
        return out
    full = counts(TrainData(cfg, dec, rank=0, world=1, position=None), 40)
    assert full[19] > 0 and full[-1] > full[19]
    first = TrainData(cfg, dec, rank=0, world=1, position=None)
    take(first, 20)
    resumed = TrainData(cfg, dec, rank=0, world=1, position=copy.deepcopy(first.position))
    assert resumed.skipped_local() == full[19]
    assert counts(resumed, 20) == full[20:]


def test_manifest_keeps_only_listed_keys(demo_data, tmp_path):
    keep = [f"train_{i:08d}" for i in range(0, 768, 3)]
    manifest = tmp_path / "kept.txt"
    manifest.write_text("# kept by a filter\n" + "\n".join(keep) + "\n")
    cfg = make_cfg(demo_data, f"data.manifest={manifest}", "data.workers=0")
    batches = take(TrainData(cfg, decoder(demo_data), rank=0, world=1, position=None), 6)
    seen = {k for b in batches for k in b["keys"]}
    assert seen and seen <= set(keep)
    with pytest.raises(ConfigError, match="data.manifest': file not found"):
        D.read_manifest(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_split_covers_every_sample_once(demo_data, world):
    urls = D.expand_shards(str(demo_data / "val"), "k")
    dec = decoder(demo_data, train=False)
    shares = [[k for b in D.eval_batches(urls, dec, 10, r, world) for k in b["keys"]] for r in range(world)]
    flat = [k for s in shares for k in s]
    assert len(flat) == len(set(flat)) == 96
    labels = [int(lab) for b in D.eval_batches(urls, dec, 50, 0, 1) for lab in b["label"]]
    assert len(labels) == 96 and min(labels) >= 0 and max(labels) < 36


def test_pipe_urls_stream_the_same_samples_as_files(demo_data):
    """`pipe:` shards (as for object stores: `pipe:aws s3 cp s3://... -`) read like local files."""
    shard = sorted((demo_data / "val").glob("*.tar"))[0]
    dec = decoder(demo_data, train=False)
    by_file = [k for b in D.eval_batches([str(shard)], dec, 16, 0, 1) for k in b["keys"]]
    by_pipe = [k for b in D.eval_batches([f"pipe:cat {shard}"], dec, 16, 0, 1) for k in b["keys"]]
    assert by_pipe == by_file and len(by_file) == 96


class CountingReads:
    """Counts the raw samples read from shards (every tar reader the pipeline opens)."""

    def __init__(self, monkeypatch):
        self.n, real = 0, D.tariterators.tarfile_samples

        def counted(*args, **kwargs):
            for sample in real(*args, **kwargs):
                self.n += 1
                yield sample
        monkeypatch.setattr(D.tariterators, "tarfile_samples", counted)


def test_resume_deep_in_the_epoch_reads_one_shard_and_the_buffers_not_the_epoch(demo_data, monkeypatch):
    """A restart after k micro-batches re-reads the current shard up to its position and the
    shards holding buffered samples (128 samples a demo shard), not the k * 8 samples consumed:
    bounded alike at k = 6 and k = 60, where replaying the epoch (a position without a reader
    record, as earlier versions wrote it) reads every consumed sample again. Both give the
    uninterrupted batches. (Text-only batches: the read position is the same, decoding cheaper.)"""
    import copy

    urls = D.expand_shards(str(demo_data / "train"), "k")
    tok = D.load_tokenizer(str(demo_data / "tokenizer"))

    def stream(position=None):
        return D.ResumableStream(urls, D.TextDecoder(tok, 24), batch_size=8, num_samples=100000, seed=0, rank=0,
                                 world=1, workers=0, shuffle_buffer=32, position=position)

    def equal(a, b):
        return a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
    uninterrupted, full, saved = stream(), [], {}
    for k in range(62):
        if k in (6, 60):
            saved[k] = copy.deepcopy(uninterrupted.position)
        full.append(uninterrupted.next())
    reads, resumed_reads = CountingReads(monkeypatch), {}
    for k, position in saved.items():
        record = position["stream"]["reader"]["0"]
        held = {d for d, _m, _key in D._buffer_of(record)} | {record["draw"]}
        reads.n = 0
        resumed = stream(copy.deepcopy(position))
        assert all(equal(a, resumed.next()) for a in full[k:k + 2]), k
        assert reads.n <= 128 * len(held) + 2 * 8, (k, reads.n, held)   # + the 2 batches themselves
        assert reads.n <= 128 * 3, (k, reads.n)                       # a 32-sample buffer spans few shards
        resumed_reads[k] = reads.n
        legacy = copy.deepcopy(position)
        del legacy["stream"]["reader"]
        reads.n = 0
        replayed = stream(legacy)
        assert all(equal(a, replayed.next()) for a in full[k:k + 2]), k
        assert reads.n >= k * 8 + 32, (k, reads.n)   # everything consumed, and the buffer's fill
    assert saved[60]["stream"]["consumed"]["0"] == 60 * 8
    assert reads.n >= 60 * 8 and max(resumed_reads.values()) < 60 * 8 / 2, resumed_reads   # measured: 96 and 144


def _pipe_shards(demo_data: Path, tmp_path: Path) -> tuple[str, Path]:
    """`pipe:` shards through a script that serves a truncated shard while FAIL holds a count > 0."""
    script, fail = tmp_path / "read.sh", tmp_path / "FAIL"
    script.write_text(f'n=$(cat {fail} 2>/dev/null || echo 0)\n'
                      f'if [ "$n" -gt 0 ]; then echo $((n - 1)) > {fail}; head -c 600 "$1"; else cat "$1"; fi\n')
    return f"pipe:sh {script} {demo_data}/train/train-{{000000..000005}}.tar", fail


def test_resume_rereads_a_shard_that_reads_short_once_and_stops_on_one_that_stays_short(demo_data, tmp_path):
    """A transient read error while restoring the position is retried (the uninterrupted run's
    batch); a shard that keeps reading short stops the stream with an error naming it, where a
    replay used to continue silently on a shifted stream."""
    import copy

    shards, fail = _pipe_shards(demo_data, tmp_path)
    cfg, dec = make_cfg(demo_data, f"data.train_shards={shards}", "data.workers=0",
                        "data.train_num_samples=100000"), decoder(demo_data)
    first = TrainData(cfg, dec, rank=0, world=1, position=None)
    take(first, 20)
    at = copy.deepcopy(first.position)
    want = first.next()
    fail.write_text("1")   # the first shard opened on resume reads short once
    assert same(TrainData(cfg, dec, rank=0, world=1, position=copy.deepcopy(at)).next(), want)
    assert fail.read_text().strip() == "0"
    fail.write_text("99")
    with pytest.raises(RuntimeError, match=r"cannot resume the data stream exactly: shard pipe:sh "
                                           r".*train-0000\d\d\.tar read differently 3 times \(it gave 0 samples"):
        TrainData(cfg, dec, rank=0, world=1, position=copy.deepcopy(at)).next()


def test_resume_stops_when_a_shard_holds_other_samples_than_recorded(demo_data, tmp_path):
    import copy

    shard_dir = tmp_path / "train"
    shutil.copytree(demo_data / "train", shard_dir)
    cfg, dec = make_cfg(demo_data, f"data.train_shards={shard_dir}", "data.workers=0",
                        "data.train_num_samples=100000"), decoder(demo_data)
    first = TrainData(cfg, dec, rank=0, world=1, position=None)
    take(first, 20)
    record = first.position["stream"]["reader"]["0"]
    current = D._Resume(first.urls, random.Random(D._seed("shards", 0, 0, 0, 0)), record, D._Counter()).drawn[-1]
    other = next(p for p in sorted(shard_dir.glob("*.tar")) if str(p) != current)
    shutil.copy(other, current)   # the data under the current shard's name changed
    with pytest.raises(RuntimeError, match=r"read differently 3 times \(sample \d+ is 'train_\d+', the checkpoint "
                                           r"recorded 'train_\d+'\)"):
        TrainData(cfg, dec, rank=0, world=1, position=copy.deepcopy(first.position)).next()


@pytest.mark.parametrize("train", [True, False])
def test_uint8_images_normalised_on_the_device_are_the_float_pipelines_inputs(demo_data, train):
    """The decoders ship uint8 images and ``to_model_pixels`` normalises them where the model runs;
    the model must see what torchvision's ToTensor + Normalize on the host gave it before (the
    same random crop for the same sample seed), in float32 bit for bit and in bf16 after the cast."""
    cfg = make_cfg(demo_data)
    mean, std = cfg.data.image_mean, cfg.data.image_std
    tok = D.load_tokenizer(str(demo_data / "tokenizer"))
    u8 = D.SampleDecoder(tok, 24, D.image_transforms(64, 0.5, train=train))
    ref = D.SampleDecoder(tok, 24, D.build_transforms(64, mean, std, 0.5, train=train))
    samples = []
    for s in D._raw_samples([str(p) for p in sorted((demo_data / "train").glob("*.tar"))[:1]], D._Counter(), None):
        samples.append(s)
        if len(samples) == 6:
            break
    got = torch.stack([u8(s, seed=100 + i)[0] for i, s in enumerate(samples)])
    want = torch.stack([ref(s, seed=100 + i)[0] for i, s in enumerate(samples)])
    assert got.dtype == torch.uint8 and want.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(D.to_model_pixels(got, "cpu", torch.float32, mean, std), want)
    assert torch.equal(D.to_model_pixels(got, "cpu", torch.bfloat16, mean, std), want.to(torch.bfloat16))
    # the independent formula: (x / 255 - mean) / std per channel
    x = got.double() / 255
    formula = (x - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(std, dtype=torch.float64)[:, None, None]
    assert torch.allclose(D.to_model_pixels(got, "cpu", torch.float32, mean, std).double(), formula, atol=1e-6)
    # already-normalised floats pass through; uint8 without the constants is refused
    assert torch.equal(D.to_model_pixels(want, "cpu", torch.float32), want)
    with pytest.raises(ValueError, match="mean and std"):
        D.to_model_pixels(got, "cpu", torch.float32)
    # the training and evaluation decoders the run builds ship uint8
    full = load_config("trainer/configs/demo.yaml", [f"tokenizer.path={demo_data}/tokenizer", "model.context_length=24"])
    for dec in (D.train_decoder(full, tok), D.eval_decoder(full, tok)):
        assert dec(samples[0], seed=1)[0].dtype == torch.uint8
    assert D.dummy_batch(u8, 64)["image"].dtype == torch.uint8
