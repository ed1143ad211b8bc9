"""Evaluation on local files: an image-folder class set (``eval.imagefolder``) and a retrieval set
with several captions per image (``eval.retrieval_images`` / ``eval.retrieval_captions``).

The `eval` verb on the tiny trained run (tests/test_eval.py's ``tiny_run``), on 1 and 2 ranks, is
checked against a plain single-process torch computation from the model's own embeddings: the
class prompts' mean text embedding per class, the full score matrices, ties against the model.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import check, run_trainer
from test_eval import tiny_run

KS = (1, 5, 10)
CLASSES = ("red_circle", "green_square", "blue_triangle")
RETRIEVAL = {   # image -> captions (one image with a single caption, one caption repeated)
    "a.png": ["a red circle", "a round red shape"],
    "b.png": ["a green square", "a square that is green"],
    "c.png": ["a blue triangle"],
    "d.png": ["a yellow circle", "a round yellow shape", "a red circle"],
    "e.png": ["a green triangle", "a pointy green shape"],
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _shape_image(path: Path, colour: str, shape: str, seed: int) -> None:
    rng = random.Random(seed)
    image = Image.new("RGB", (48, 48), tuple(rng.randrange(0, 80) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    x, y, r = rng.randrange(14, 34), rng.randrange(14, 34), rng.randrange(8, 14)
    box = (x - r, y - r, x + r, y + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    image.save(path)


def make_sets(root: Path) -> dict:
    """A 3-class x 4-image folder and a 5-image retrieval set with its captions JSON."""
    folder = root / "classes"
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        colour, shape = name.split("_")
        for i in range(4):
            _shape_image(folder / name / f"{i}.png", colour, shape, seed=10 * c + i)
    images = root / "retrieval"
    images.mkdir()
    for i, (name, caps) in enumerate(RETRIEVAL.items()):
        colour, shape = caps[0].split()[1:3]
        _shape_image(images / name, colour, shape, seed=100 + i)
    captions = root / "captions.json"
    captions.write_text(json.dumps(RETRIEVAL))
    return {"folder": folder, "images": images, "captions": captions}


def set_overrides(sets: dict) -> list[str]:
    return [f"eval.imagefolder={sets['folder']}", f"eval.retrieval_images={sets['images']}",
            f"eval.retrieval_captions={sets['captions']}"]


# ---------------------------------------------------------------------------------------------
# The reference: plain torch, one process, from the model's own embeddings


@torch.no_grad()
def reference(checkpoint: Path, sets: dict) -> dict:
    from trainer.data import eval_decoder, load_tokenizer, model_pixels
    from trainer.eval_sets import load_imagenet1k
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config

    cfg, root, tag = checkpoint_config(str(checkpoint), [])
    tok = load_tokenizer(cfg.tokenizer.path)
    model = load_trained_model(cfg, root, tag, tok).eval()
    dec = eval_decoder(cfg, tok)

    def images(paths):
        pixels = torch.stack([dec.transform(Image.open(p).convert("RGB")) for p in paths])   # uint8
        return model.encode_image(model_pixels(cfg)(pixels, "cpu", torch.float32)).double()

    def texts(strings):
        t = dec.tokenize(strings)
        return model.encode_text(t["input_ids"], t["attention_mask"]).double()

    templates = load_imagenet1k()[1]
    classifier = torch.stack([F.normalize(texts([t.format(c.replace("_", " ")) for t in templates]).mean(0), dim=-1)
                              for c in CLASSES])
    paths = [p for c in CLASSES for p in sorted((sets["folder"] / c).iterdir())]
    labels = torch.tensor([c for c in range(len(CLASSES)) for _ in range(4)])
    top = (images(paths) @ classifier.T).argsort(1, descending=True)
    out = {"imagefolder/top1": (top[:, 0] == labels).double().mean().item(),
           "imagefolder/top5": (top[:, :5] == labels[:, None]).any(1).double().mean().item(),
           "imagefolder/num_samples": len(paths)}

    names = list(RETRIEVAL)
    caps = [c for n in names for c in RETRIEVAL[n]]
    owner = torch.tensor([i for i, n in enumerate(names) for _ in RETRIEVAL[n]])
    sim = images([sets["images"] / n for n in names]) @ texts(caps).T            # [I, T]
    for i in range(len(names)):   # image i: its best caption against the other images' captions
        own = owner == i
        rank = (sim[i][~own] >= sim[i][own].max()).sum()
        for k in KS:
            out[f"retrieval/i2t_r{k}"] = out.get(f"retrieval/i2t_r{k}", 0) + float(rank < k) / len(names)
    for j in range(len(caps)):    # caption j: its image against the other images
        others = torch.arange(len(names)) != owner[j]
        rank = (sim[others, j] >= sim[owner[j], j]).sum()
        for k in KS:
            out[f"retrieval/t2i_r{k}"] = out.get(f"retrieval/t2i_r{k}", 0) + float(rank < k) / len(caps)
    out.update({"retrieval/num_images": len(names), "retrieval/num_captions": len(caps)})
    return out


# ---------------------------------------------------------------------------------------------
# The eval verb on 1 and 2 ranks


@pytest.fixture(scope="module")
def tiny(demo_data, tmp_path_factory) -> Path:
    return tiny_run(demo_data, tmp_path_factory)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    return make_sets(tmp_path_factory.mktemp("eval-sets"))


@pytest.mark.full
@pytest.mark.parametrize("nproc", [1, 2])
def test_eval_verb_on_folder_and_retrieval_sets_equals_torch_reference(tiny, sets, tmp_path, nproc):
    out = tmp_path / "eval.json"
    # batch 2: ranks hold 2 and 3 retrieval images, so one rank runs a dummy forward in lockstep
    check(run_trainer(["eval", "--checkpoint", str(tiny / "checkpoints"), "--out", str(out),
                       "eval.batch_size=2", *set_overrides(sets)], nproc=nproc))
    got, want = json.loads(out.read_text()), reference(tiny / "checkpoints", sets)
    assert 0 < want["retrieval/t2i_r1"] < 1 or 0 < want["retrieval/i2t_r1"] < 1   # not a degenerate ranking
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["num_samples"] == 96 and "zeroshot_top1" in got   # the val shards' eval is still there


@pytest.mark.full
def test_multi_caption_recall_counts_ties_against_the_model():
    from trainer.evaluate import multi_caption_recall
    img = torch.eye(3)
    # image 0's captions: text 0 (ties with image 1's text 2) and text 1 (orthogonal)
    txt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    got = multi_caption_recall(img, txt, torch.tensor([0, 0, 1, 2]))
    assert got["retrieval/i2t_r1"] == pytest.approx(1 / 3)    # images 0 and 1 tie: only image 2 hits
    assert got["retrieval/t2i_r1"] == pytest.approx(1 / 4)    # texts 0 and 2 tie, text 1 scores 0 everywhere


@pytest.mark.full
def test_captions_file_formats_read_alike(tmp_path, sets):
    from trainer.eval_sets import read_retrieval
    want = read_retrieval(str(sets["images"]), str(sets["captions"]))
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("".join(f"{n}#{i}\t{c}\n" for n, caps in RETRIEVAL.items() for i, c in enumerate(caps)))
    karpathy = tmp_path / "dataset.json"
    karpathy.write_text(json.dumps({"images": [{"filename": n, "split": "test", "sentences": [{"raw": c} for c in caps]}
                                               for n, caps in RETRIEVAL.items()]
                                   + [{"filename": "train.png", "split": "train", "sentences": [{"raw": "x"}]}]}))
    for path in (tsv, karpathy):
        assert read_retrieval(str(sets["images"]), str(path)) == want, path


# ---------------------------------------------------------------------------------------------
# Bad input and the shipped ImageNet file (fast)


def test_bad_eval_sets_fail_with_one_error_line_and_the_imagenet_file_is_whole(tiny, tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.eval_sets import check_eval_sets, load_imagenet1k

    names, templates = load_imagenet1k()
    assert len(names) == 1000 and len(set(names)) > 990 and len(templates) == 80
    assert all(t.count("{}") == 1 for t in templates) and names[0] == "tench"

    sets = make_sets(tmp_path)
    (sets["folder"] / "empty_class").mkdir()
    proc = run_trainer(["eval", "--checkpoint", str(tiny / "checkpoints"), *set_overrides(sets)])
    text = check(proc, code=2)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(sets["folder"] / "empty_class") in errors[0], text
    assert "Traceback" not in text

    (sets["folder"] / "empty_class").rmdir()
    sets["captions"].write_text(json.dumps({**RETRIEVAL, "missing.jpg": ["nowhere"]}))
    cfg = load_config("trainer/configs/demo.yaml", set_overrides(sets))
    with pytest.raises(ConfigError, match=r"missing\.jpg"):
        check_eval_sets(cfg)


@pytest.mark.full
def test_class_names_auto_imagenet_for_1000_folders_else_folder_names(tmp_path):
    import os

    from trainer.config import ConfigError
    from trainer.eval_sets import load_imagenet1k, read_imagefolder

    pixel = tmp_path / "pixel.png"
    Image.new("RGB", (1, 1)).save(pixel)
    root = tmp_path / "val"
    wnids = [f"n{i:08d}" for i in range(1000)]   # sorted like ImageNet's wnids
    for wnid in reversed(wnids):                 # created out of order: the listing sorts
        (root / wnid).mkdir(parents=True)
        os.link(pixel, root / wnid / "x.JPEG")
    got = read_imagefolder(str(root), "auto")
    names, templates = load_imagenet1k()
    assert got.classnames == names and got.templates == templates and got.labels == list(range(1000))
    assert got.paths[0].parent.name == wnids[0] and got.classnames[0] == "tench"
    assert read_imagefolder(str(root), "folders").classnames == wnids

    small = tmp_path / "small"
    for name in ("b_class", "a_class"):
        (small / name).mkdir(parents=True)
        os.link(pixel, small / name / "x.png")
    assert read_imagefolder(str(small)).classnames == ["a class", "b class"]
    with pytest.raises(ConfigError, match="not ImageNet-1k's 1000"):
        read_imagefolder(str(small), "imagenet")
    spec = tmp_path / "classes.json"
    spec.write_text(json.dumps({"classnames": ["first", "second"], "templates": ["a {} thing"]}))
    got = read_imagefolder(str(small), str(spec))
    assert got.classnames == ["first", "second"] and got.templates == ["a {} thing"]
    spec.write_text(json.dumps({"classnames": ["only one"]}))
    with pytest.raises(ConfigError, match="names 1 classes"):
        read_imagefolder(str(small), str(spec))
