"""Tests for trainer.demo_data (the make-demo-data synthetic data set)."""
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import demo_data
from trainer.demo_data import CLASSNAMES, COLOURS, make_demo_data

SMALL = dict(num_train=300, num_val=60, num_text=50, shard_size=100, noise_rate=0.2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, make_demo_data(out, seed=0, **SMALL)


def read_samples(paths):
    """{key: {ext: bytes}} for all members of the given tar shards, in order."""
    samples = defaultdict(dict)
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tar.extractfile(m).read()
    return samples


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_layout_and_summary(demo):
    out, s = demo
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["val-000000.tar"]
    assert sorted(p.name for p in (out / "text").iterdir()) == ["text-000000.tar"]
    assert (out / "zeroshot.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert s["num_train"] == 300 and s["num_val"] == 60 and s["num_text"] == 50
    assert s["num_classes"] == 36 and s["num_noisy"] == 60
    assert s["train_shards"] == [str(out / "train" / f"train-00000{i}.tar") for i in range(3)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_noisy"] == 60 and manifest["val_shards"] == ["val/val-000000.tar"]
    assert not list(out.rglob("*.tmp"))


def test_every_sample_complete_and_decodable(demo):
    out, s = demo
    train, val = read_samples(s["train_shards"]), read_samples(s["val_shards"])
    text = read_samples(s["text_shards"])
    assert (len(train), len(val), len(text)) == (300, 60, 50)
    assert not set(train) & set(val)  # keys unique across the data set
    assert list(train)[:2] == ["train_00000000", "train_00000001"]
    for key, members in {**train, **val}.items():
        assert set(members) == {"jpg", "txt", "json"}, key
        img = Image.open(io.BytesIO(members["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
        meta = json.loads(members["json"])
        assert meta["key"] == key and 0 <= meta["label"] < 36
        assert meta["caption"] == members["txt"].decode()
    for key, members in text.items():
        assert set(members) == {"txt"} and len(members["txt"].decode().split()) >= 3


def test_webdataset_reads_everything(demo):
    import webdataset as wds   # pinned in requirements.txt: a missing one is an error, not a skip
    _, s = demo
    ds = wds.WebDataset(s["train_shards"], shardshuffle=False).decode("pil").to_tuple(
        "jpg", "txt", "json")
    items = list(ds)
    assert len(items) == 300
    img, txt, meta = items[0]
    assert img.size == (64, 64) and isinstance(txt, str) and meta["key"] == "train_00000000"
    assert len(list(wds.WebDataset(s["val_shards"], shardshuffle=False))) == 60


def test_captions_labels_and_noise(demo):
    _, s = demo
    metas = [json.loads(m["json"]) for m in read_samples(s["train_shards"]).values()]
    noisy = [m for m in metas if m["noisy"]]
    assert len(noisy) == round(0.2 * 300)
    for m in metas:
        assert CLASSNAMES[m["caption_label"]] in m["caption"]
        if m["noisy"]:
            assert m["caption_label"] != m["label"]
            assert CLASSNAMES[m["label"]] not in m["caption"]
            assert CLASSNAMES[m["label"]] in m["original_caption"]
        else:
            assert m["caption_label"] == m["label"] and m["caption"] == m["original_caption"]
    val = [json.loads(m["json"]) for m in read_samples(s["val_shards"]).values()]
    assert not any(m["noisy"] for m in val)
    assert all(CLASSNAMES[m["label"]] in m["caption"] for m in val)
    assert len({m["label"] for m in val}) == 36  # class-balanced: 60 >= 36 covers all


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.5, 0.999])
def test_noise_count_is_exact(rate):
    samples = demo_data._make_split("train", 300, seed=3)
    assert demo_data._add_noise(samples, rate, seed=3) == round(rate * 300)
    assert sum(s["noisy"] for s in samples) == round(rate * 300)
    assert all(s["caption_label"] != s["label"] for s in samples if s["noisy"])


def test_image_shows_the_labelled_class():
    rng = np.random.default_rng(7)
    colours = np.array(list(COLOURS.values()), dtype=float)
    checked = 0
    for label in range(36):
        spec = demo_data._sample_spec(rng, label)
        m = spec["main"]
        assert CLASSNAMES[label] == f"{m['colour']} {m['shape']}"
        if m["shape"] == "ring":  # its centre is the hole
            continue
        img = np.asarray(Image.open(io.BytesIO(demo_data.render_image(spec, 64))), dtype=float)
        pixel = img[int(m["cy"] * 64), int(m["cx"] * 64)]
        assert np.argmin(np.linalg.norm(colours - pixel, axis=1)) == label % 6, (label, pixel)
        checked += 1
    assert checked == 30


def test_zeroshot_json(demo):
    out, _ = demo
    zs = json.loads((out / "zeroshot.json").read_text())
    assert zs["classnames"] == CLASSNAMES and len(set(CLASSNAMES)) == 36
    assert CLASSNAMES[0] == "red circle" and CLASSNAMES[demo_data.class_index(1, 4)] == "blue square"
    assert "a photo of a {}." in zs["templates"] and len(zs["templates"]) >= 4
    assert all(t.count("{}") == 1 for t in zs["templates"])


def test_deterministic_per_seed(demo, tmp_path):
    out, _ = demo
    make_demo_data(tmp_path / "same", seed=0, **SMALL)
    make_demo_data(tmp_path / "other", seed=1, **SMALL)
    reference = all_files(out)
    assert all_files(tmp_path / "same") == reference  # tars, tokenizer, zeroshot.json
    other = all_files(tmp_path / "other")
    assert other["train/train-000000.tar"] != reference["train/train-000000.tar"]
    assert other["val/val-000000.tar"] != reference["val/val-000000.tar"]


def test_tokenizer_loads_offline(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    out, s = demo
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok.model_max_length == 77 and s["vocab_size"] == len(tok) > 300
    ids = tok("a Red circle", padding="max_length", max_length=16)["input_ids"]
    words = tok("a red circle", add_special_tokens=False)["input_ids"]
    assert ids == [2] + words + [3] + [0] * (14 - len(words))
    assert 2 not in words and 3 not in words and 1 not in words
    caption = json.loads(read_samples(s["train_shards"])["train_00000005"]["json"])["caption"]
    assert tok.decode(tok(caption)["input_ids"], skip_special_tokens=True) == caption
    long = tok("a photo of a red circle. " * 30, truncation=True, max_length=77)["input_ids"]
    assert len(long) == 77 and long[0] == 2 and long[-1] == 3


@pytest.mark.parametrize("kwargs, name", [
    ({"num_train": -1}, "num_train"), ({"num_val": -5}, "num_val"),
    ({"num_text": -1}, "num_text"), ({"noise_rate": 1.0}, "noise_rate"),
    ({"noise_rate": -0.1}, "noise_rate"), ({"shard_size": 0}, "shard_size"),
    ({"seed": -1}, "seed"), ({"num_train": 2.5}, "num_train"), ({"image_size": 4}, "image_size"),
])
def test_bad_arguments_raise(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        make_demo_data(tmp_path / "bad", **kwargs)
    assert "[0, 1)" in str(err.value) if name == "noise_rate" else ">=" in str(err.value)
    assert not (tmp_path / "bad").exists()  # validated before anything is written


def test_cli_run_reports_bad_input(tmp_path, capsys):
    import argparse
    parser = argparse.ArgumentParser()
    demo_data.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "x"), "--noise-rate", "1.5"])
    assert demo_data.run(args) == 2
    err = capsys.readouterr().err
    assert "noise_rate" in err and "[0, 1)" in err and "Traceback" not in err
