"""Procedurally generated, learnable image-caption demo data set (``make-demo-data``).

    from trainer.demo_data import make_demo_data, CLASSNAMES
    summary = make_demo_data("data/demo", num_train=10000, num_val=1000, noise_rate=0.1, seed=0)

Writes (img2dataset/WebDataset layout)::

    DIR/train/train-000000.tar ...   KEY.jpg, KEY.txt (caption), KEY.json (metadata)
    DIR/val/val-000000.tar ...       same; KEY.json "label" is the zero-shot target
    DIR/text/text-000000.tar ...     KEY.txt only (language-modelling stream)
    DIR/zeroshot.json                {"classnames": CLASSNAMES, "templates": [...]}
    DIR/tokenizer/                   byte-level BPE; AutoTokenizer.from_pretrained loads it
    DIR/manifest.json                the summary dict, written last (marks a complete data set)

Classes: 6 shapes x 6 colours; class index = shape_idx * 6 + colour_idx, name "colour shape"
(index 0 = "red circle", 1 = "yellow circle", ..., 35 = "purple ring").
KEY.json: {"label", "classname", "noisy", "caption_label", "second_label", "original_caption", ...}.
"""
import functools
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
# Saturated and hue-spread so that JPEG artefacts and +-12 jitter never make classes collide.
# No colour starts with a vowel, so "a photo of a {}." stays grammatical for every class.
COLOURS = {"red": (220, 30, 30), "yellow": (235, 210, 30), "green": (40, 170, 50),
           "cyan": (30, 195, 215), "blue": (35, 70, 225), "purple": (150, 45, 205)}
COLOUR_NAMES = tuple(COLOURS)
CLASSNAMES = [f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES]  # index = shape*6 + colour
TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.",
             "a drawing of a {}.", "a small {}.", "a large {}.", "a {} on a background."]
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]  # ids 0, 1, 2, 3
_CLASS_RGB = np.array(list(COLOURS.values()), dtype=np.float64)
_SHAPE_FACTS = {"circle": "is round and has no corners", "square": "has four equal sides",
                "triangle": "has three sides and three corners", "star": "has five points",
                "cross": "is made of two bars that cross in the middle",
                "ring": "is a circle with a hole in the middle"}
_SPLIT_IDS = {"train": 0, "val": 1, "text": 2}


def class_index(shape_idx, colour_idx):
    """``class_index(0, 0) == 0`` ("red circle"); inverse: ``divmod(label, 6)``."""
    return shape_idx * len(COLOUR_NAMES) + colour_idx


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _validate(num_train, num_val, num_text, noise_rate, seed, image_size, shard_size):
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                             ("num_text", num_text, 0), ("seed", seed, 0),
                             ("image_size", image_size, 16), ("shard_size", shard_size, 1)):
        _check_int(name, value, low)
    if isinstance(noise_rate, bool) or not isinstance(noise_rate, (int, float)) \
            or not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be a number in [0, 1), got {noise_rate!r}")


# ----------------------------------------------------------------------------- sampling
def _muted_colour(rng):
    """A low-saturation colour at least 90 RGB units from every class colour."""
    while True:
        c = rng.uniform(25, 225) + rng.uniform(-22, 22, size=3)
        if np.min(np.linalg.norm(_CLASS_RGB - c, axis=1)) >= 90:
            return [int(v) for v in np.clip(c, 0, 255)]


def _sample_shape(rng, label, size_lo, size_hi):
    shape_idx, colour_idx = divmod(int(label), len(COLOUR_NAMES))
    size = float(rng.uniform(size_lo, size_hi))  # diameter as a fraction of the image side
    r = size / 2
    rgb = np.clip(_CLASS_RGB[colour_idx] + rng.integers(-12, 13, size=3), 0, 255)
    return {"label": int(label), "shape": SHAPES[shape_idx], "colour": COLOUR_NAMES[colour_idx],
            "rgb": [int(v) for v in rgb], "size": size,
            "cx": float(rng.uniform(r, 1 - r)), "cy": float(rng.uniform(r, 1 - r)),
            "theta": float(rng.uniform(0, 2 * np.pi))}


def _sample_spec(rng, label):
    """Everything needed to render and caption one image, drawn from ``rng``."""
    main = _sample_shape(rng, label, 0.35, 0.70)
    second = None
    if rng.random() < 0.3:
        other = int(rng.integers(len(CLASSNAMES) - 1))
        other += other >= label  # any class but the main one
        second = _sample_shape(rng, other, 0.16, 0.26)
        # Of 6 candidate centres keep the farthest from the main shape, so it stays visible.
        r = second["size"] / 2
        cands = rng.uniform(r, 1 - r, size=(6, 2))
        best = np.argmax(np.hypot(cands[:, 0] - main["cx"], cands[:, 1] - main["cy"]))
        second["cx"], second["cy"] = float(cands[best, 0]), float(cands[best, 1])
    kind = ("plain", "gradient", "two-tone", "noisy")[int(rng.integers(4))]
    c1 = _muted_colour(rng)
    c2 = _muted_colour(rng) if kind in ("gradient", "two-tone") else c1
    bg = {"kind": kind, "c1": c1, "c2": c2, "angle": float(rng.uniform(0, 2 * np.pi)),
          "offset": float(rng.uniform(-0.3, 0.3)), "noise_seed": int(rng.integers(2**31))}
    return {"main": main, "second": second, "bg": bg}


# ---------------------------------------------------------------------------- captions
def _position_phrase(cx, cy):
    row = ("top", "middle", "bottom")[min(int(cy * 3), 2)]
    col = ("left", "center", "right")[min(int(cx * 3), 2)]
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"in the {row} {col}"


def _background_phrase(bg):
    lum = np.mean(np.array(bg["c1"]) + np.array(bg["c2"])) / 2
    tone = "dark" if lum < 95 else "light" if lum > 165 else "grey"
    kind = {"plain": "", "gradient": " gradient", "two-tone": " two-tone", "noisy": " noisy"}
    return f"on a {tone}{kind[bg['kind']]} background"


def _caption(spec, rng):
    """Varied English; always contains the main shape's "colour shape" verbatim."""
    m, s = spec["main"], spec["second"]
    adj = "small " if m["size"] < 0.45 else "large " if m["size"] > 0.6 else ""
    adj = adj if rng.random() < 0.6 else ""
    head = ("a {}", "a photo of a {}", "a picture of a {}", "there is a {}", "an image of a {}",
            "a drawing of a {}", "a {} shape")[int(rng.integers(7))]
    parts = [head.format(f"{adj}{m['colour']} {m['shape']}")]
    if rng.random() < 0.4:
        parts.append(_position_phrase(m["cx"], m["cy"]))
    if rng.random() < 0.4:
        parts.append(_background_phrase(spec["bg"]))
    if s is not None and rng.random() < 0.7:
        link = ("next to a {}", "and a small {}", "with a little {} nearby")[int(rng.integers(3))]
        parts.append(("," if link.startswith("next") else "") + " " + link.format(
            f"{s['colour']} {s['shape']}"))
    text = " ".join(parts).replace(" ,", ",").replace("  ", " ")
    return text + ("." if rng.random() < 0.3 else "")


def _text_sample(rng):
    """A few descriptive sentences in the caption vocabulary (some long)."""
    sentences = []
    for _ in range(int(rng.integers(1, 7))):
        a, b = (divmod(int(rng.integers(len(CLASSNAMES))), 6) for _ in range(2))
        sa, ca, sb, cb = SHAPES[a[0]], COLOUR_NAMES[a[1]], SHAPES[b[0]], COLOUR_NAMES[b[1]]
        kind = int(rng.integers(4))
        if kind == 0:
            sentences.append(f"a {sa} {_SHAPE_FACTS[sa]}.")
        elif kind == 1:
            sentences.append(f"the {ca} {sa} is {('larger', 'smaller')[int(rng.integers(2))]}"
                             f" than the {cb} {sb}.")
        elif kind == 2:
            same = "the same colour" if ca == cb else "different colours"
            sentences.append(f"a {ca} {sa} and a {cb} {sb} have {same}.")
        else:
            spec = _sample_spec(rng, int(rng.integers(len(CLASSNAMES))))
            sentences.append(_caption(spec, rng).rstrip(".") + ".")
    return " ".join(sentences)


# --------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=8)
def _unit_grid(side):
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1) - 0.5
    return yy, xx


def _background(bg, side):
    """uint8 [side, side, 3] background (drawn at image size: it needs no anti-aliasing)."""
    c1, c2 = np.array(bg["c1"], np.float32), np.array(bg["c2"], np.float32)
    if bg["kind"] in ("plain", "noisy"):
        img = np.broadcast_to(c1, (side, side, 3))
    else:
        yy, xx = _unit_grid(side)
        t = xx * np.cos(bg["angle"]) + yy * np.sin(bg["angle"]) - bg["offset"] * 0.5
        t = (t > 0).astype(np.float32) if bg["kind"] == "two-tone" else np.clip(t + 0.5, 0, 1)
        img = c1 + (c2 - c1) * t[..., None]
    if bg["kind"] == "noisy":
        img = img + np.random.default_rng(bg["noise_seed"]).normal(0, 14, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape, cx, cy, r, theta):
    if shape == "square":
        ang, rad = np.arange(4) * np.pi / 2 + np.pi / 4, np.ones(4)
    elif shape == "triangle":
        ang, rad = np.arange(3) * 2 * np.pi / 3, np.ones(3)
    elif shape == "star":
        ang, rad = np.arange(10) * np.pi / 5, np.tile([1.0, 0.45], 5)
    else:  # cross: a plus sign with arms of half-width w
        w = 0.33
        pts = np.array([(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1),
                        (w, -1), (w, -w), (1, -w), (1, w), (w, w)])
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    ang = ang + theta
    return [(cx + r * q * np.cos(a), cy + r * q * np.sin(a)) for a, q in zip(ang, rad)]


def _draw_shape(draw, s, side):
    cx, cy, r, rgb = s["cx"] * side, s["cy"] * side, s["size"] * side / 2, tuple(s["rgb"])
    if s["shape"] in ("circle", "ring"):
        r *= 0.9  # round shapes look larger than polygons of the same circumradius
        box = (cx - r, cy - r, cx + r, cy + r)
        if s["shape"] == "circle":
            draw.ellipse(box, fill=rgb)
        else:
            draw.ellipse(box, outline=rgb, width=max(2, int(round(r * 0.35))))
    else:
        draw.polygon(_polygon(s["shape"], cx, cy, r, s["theta"]), fill=rgb)


def render_image(spec, image_size=64):
    """JPEG bytes of one sample; drawn at 2x and box-downsampled for anti-aliased edges."""
    side = 2 * image_size
    img = Image.fromarray(_background(spec["bg"], image_size)).resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for s in (spec["second"], spec["main"]):  # main last so it is never occluded
        if s is not None:
            _draw_shape(draw, s, side)
    buf = io.BytesIO()
    img.reduce(2).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing
def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed fields: reproducible bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shards(dirname, split, samples, shard_size, encode):
    """Write ``samples`` in shards of ``shard_size``; ``encode(sample) -> {ext: bytes}``."""
    os.makedirs(dirname, exist_ok=True)
    for old in os.listdir(dirname):  # drop stale shards of an earlier, larger run
        if old.startswith(f"{split}-") and old.endswith((".tar", ".tar.tmp")):
            os.remove(os.path.join(dirname, old))
    paths = []
    for start in range(0, len(samples), shard_size):
        path = os.path.join(dirname, f"{split}-{start // shard_size:06d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[start:start + shard_size]:
                for ext, data in encode(sample).items():
                    _add_member(tar, f"{sample['key']}.{ext}", data)
        os.replace(path + ".tmp", path)  # readers never see a half-written shard
        paths.append(path)
    return paths


def _make_split(split, num, seed):
    """Specs + captions, class-balanced labels in a seeded random order."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    labels = rng.permutation(np.resize(np.arange(len(CLASSNAMES)), num))
    samples = []
    for i, label in enumerate(labels):
        spec = _sample_spec(rng, int(label))
        cap = _caption(spec, rng)
        second = spec["second"]["label"] if spec["second"] else None
        samples.append({"key": f"{split}_{i:08d}", "spec": spec, "caption": cap,
                        "original_caption": cap, "label": int(label), "caption_label": int(label),
                        "second_label": second, "noisy": False})
    return samples


def _add_noise(samples, noise_rate, seed):
    """Give exactly round(rate * N) samples the caption of a sample showing another class."""
    n = len(samples)
    k = int(round(noise_rate * n))
    rng = np.random.default_rng([seed, 3])
    for i in sorted(rng.choice(n, size=k, replace=False).tolist()):
        s = samples[i]
        # Donor captions must not mention s's class at all (neither main nor second shape).
        ok = lambda d: d["label"] != s["label"] and d["second_label"] != s["label"]
        donor = next((samples[j] for j in rng.integers(n, size=64) if ok(samples[j])), None)
        donor = donor or next((d for d in samples if ok(d)), None)
        if donor is None:  # degenerate tiny sets: synthesise a caption of another class
            other = (s["label"] + 1 + int(rng.integers(len(CLASSNAMES) - 1))) % len(CLASSNAMES)
            donor = {"original_caption": CLASSNAMES[other], "label": other}
        s.update(caption=donor["original_caption"], caption_label=donor["label"], noisy=True)
    return k


def _encode_image_sample(sample, image_size):
    meta = {k: sample[k] for k in ("key", "label", "noisy", "caption_label", "second_label",
                                   "original_caption")}
    m = sample["spec"]["main"]
    meta.update(classname=CLASSNAMES[sample["label"]], caption=sample["caption"],
                size=round(m["size"], 4), background=sample["spec"]["bg"]["kind"])
    return {"jpg": render_image(sample["spec"], image_size), "txt": sample["caption"].encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


def build_tokenizer(texts, out_dir, vocab_size=1500):
    """Train a lowercase byte-level BPE on ``texts`` and save it for AutoTokenizer.

    Ids: pad=0, unk=1, bos=2, eos=3 (eos != 2: transformers' CLIP treats eos id 2 as legacy
    argmax pooling). Encoding adds ``<|startoftext|> ... <|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[1]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, 2), (eos, 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=SPECIAL_TOKENS[0], unk_token=SPECIAL_TOKENS[1],
                                   model_max_length=77)
    fast.save_pretrained(out_dir)
    return len(tok.get_vocab())


def _write_manifest(summary, path):
    """Save the summary with paths relative to out_dir, so the data set can be moved."""
    root = summary["out_dir"]
    rel = lambda v: [os.path.relpath(p, root) for p in v] if isinstance(v, list) \
        else os.path.relpath(v, root)
    saved = {k: rel(v) if k.endswith("_shards") or k in ("zeroshot", "tokenizer") else v
             for k, v in summary.items() if k != "out_dir"}
    with open(path + ".tmp", "w") as f:
        json.dump(saved, f, indent=1)
    os.replace(path + ".tmp", path)  # written last: its presence marks a complete data set


def make_demo_data(out_dir, *, num_train=10000, num_val=1000, num_text=4000, noise_rate=0.0,
                   seed=0, image_size=64, shard_size=1000):
    """Write the demo data set to ``out_dir``; return (and save as manifest.json) a summary.

    >>> s = make_demo_data("/tmp/demo", num_train=300, num_val=60, noise_rate=0.2)
    >>> s["num_noisy"], s["num_classes"], s["train_shards"][0]
    (60, 36, '/tmp/demo/train/train-000000.tar')
    Raises ValueError (naming the argument and its allowed range) on bad arguments.
    """
    _validate(num_train, num_val, num_text, noise_rate, seed, image_size, shard_size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):
        os.remove(manifest)  # absent manifest == incomplete data set while we rewrite
    train, val = _make_split("train", num_train, seed), _make_split("val", num_val, seed)
    num_noisy = _add_noise(train, noise_rate, seed)
    text_rng = np.random.default_rng([seed, _SPLIT_IDS["text"]])
    texts = [{"key": f"text_{i:08d}", "caption": _text_sample(text_rng)} for i in range(num_text)]
    encode = lambda s: _encode_image_sample(s, image_size)
    summary = {
        "out_dir": out_dir, "num_train": num_train, "num_val": num_val, "num_text": num_text,
        "num_noisy": num_noisy, "noise_rate": noise_rate, "seed": seed, "image_size": image_size,
        "num_classes": len(CLASSNAMES),
        "train_shards": _write_shards(os.path.join(out_dir, "train"), "train", train,
                                      shard_size, encode),
        "val_shards": _write_shards(os.path.join(out_dir, "val"), "val", val, shard_size, encode),
        "text_shards": _write_shards(os.path.join(out_dir, "text"), "text", texts, shard_size,
                                     lambda s: {"txt": s["caption"].encode()}),
        "zeroshot": os.path.join(out_dir, "zeroshot.json"),
        "tokenizer": os.path.join(out_dir, "tokenizer"),
    }
    with open(summary["zeroshot"], "w") as f:
        json.dump({"classnames": CLASSNAMES, "templates": TEMPLATES}, f, indent=1)
    prompts = [t.format(c) for t in TEMPLATES for c in CLASSNAMES]
    corpus = [s["original_caption"] for s in train] + [t["caption"] for t in texts] + prompts
    summary["vocab_size"] = build_tokenizer(corpus, summary["tokenizer"])
    _write_manifest(summary, manifest)
    return summary


def add_arguments(parser):
    """Add the ``make-demo-data`` options to an argparse parser."""
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--num-text", type=int, default=4000)
    parser.add_argument("--noise-rate", type=float, default=0.0,
                        help="fraction of train captions swapped for another class's, in [0, 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)


def run(args):
    """Run from parsed ``add_arguments`` options; returns an exit status (2 on bad input)."""
    import sys
    try:
        s = make_demo_data(args.out, num_train=args.num_train, num_val=args.num_val,
                           num_text=args.num_text, noise_rate=args.noise_rate, seed=args.seed,
                           image_size=args.image_size, shard_size=args.shard_size)
    except ValueError as e:
        print(f"make-demo-data: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['num_train']} train ({s['num_noisy']} noisy), {s['num_val']} val, "
          f"{s['num_text']} text samples, {s['num_classes']} classes to {s['out_dir']}")
    return 0


if __name__ == "__main__":
    import argparse
    _parser = argparse.ArgumentParser(prog="make-demo-data")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
