"""Evaluation sets read from plain local files: an image-folder class set and a retrieval set.

    folder = read_imagefolder("imagenet/val", "auto")   # .paths, .labels, .classnames, .templates
    pairs = read_retrieval("flickr30k/images", "flickr30k/captions.json")
    # pairs.images (paths), pairs.captions, pairs.owner (caption j describes image owner[j])
    lo, hi = share(len(folder.paths), rank, world)      # this rank's contiguous slice

Image folder (``eval.imagefolder``): ImageNet's layout, one sub-folder per class holding its
images; classes in sorted folder order. Class names (``eval.imagefolder_classes``): ``auto``
(OpenAI's ImageNet-1k names when there are exactly 1000 class folders, the sorted wnids'
order; else the folder names, ``_`` read as a space), ``folders``, ``imagenet``, or a JSON file
``{"classnames": [...], "templates": [...]?}`` (one name per folder, in sorted order). Prompts:
OpenAI's 80 ImageNet templates unless the JSON file gives its own.

Retrieval captions (``eval.retrieval_captions``), image paths relative to
``eval.retrieval_images``: a ``.json`` file that is either ``{"IMAGE": ["caption", ...], ...}``
or Karpathy's split file (``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``, its
``test`` split), or else a text file of ``IMAGE<TAB>caption`` lines (Flickr8k's token file,
whose ``IMAGE#n`` suffix is dropped). Images keep their order of first appearance.

Everything here raises :class:`ConfigError` naming the key and the path, so a bad set fails
before any process group starts (trainer/preflight.py and the ``eval`` verb call
:func:`check_eval_sets`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .config import ConfigError

IMAGENET1K_JSON = Path(__file__).parent / "zeroshot" / "imagenet1k.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class ImageFolderSet:
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalSet:
    images: list[Path]
    captions: list[str]
    owner: list[int]   # caption j describes images[owner[j]]


def load_imagenet1k() -> tuple[list[str], list[str]]:
    """OpenAI's ImageNet-1k class names (sorted-wnid order) and its 80 prompt templates."""
    spec = json.loads(IMAGENET1K_JSON.read_text())
    return list(spec["classnames"]), list(spec["templates"])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _class_names(spec: str, folders: list[Path]) -> tuple[list[str], list[str] | None]:
    """Names for ``folders`` (sorted) and the JSON file's own templates, if it gives any."""
    key = "eval.imagefolder_classes"
    if spec == "imagenet" or (spec == "auto" and len(folders) == 1000):
        if len(folders) != 1000:
            raise ConfigError(f"config key '{key}' is 'imagenet' but the folder has {len(folders)} class "
                              "folders, not ImageNet-1k's 1000")
        return load_imagenet1k()[0], None
    if spec in ("auto", "folders"):
        return [f.name.replace("_", " ") for f in folders], None
    path = Path(spec)
    try:
        given = json.loads(path.read_text())
        names, templates = list(given["classnames"]), given.get("templates")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"config key '{key}': {spec} is neither auto | folders | imagenet nor a JSON file "
                          f"with a 'classnames' list ({type(err).__name__}: {err})") from None
    if len(names) != len(folders):
        raise ConfigError(f"config key '{key}': {spec} names {len(names)} classes but the folder has "
                          f"{len(folders)} class folders")
    if templates is not None and (not templates or any("{}" not in str(t) for t in templates)):
        raise ConfigError(f"config key '{key}': {spec}'s 'templates' must be a non-empty list, each with '{{}}'")
    return names, templates and [str(t) for t in templates]


def read_imagefolder(root: str, classes: str = "auto") -> ImageFolderSet:
    key = "eval.imagefolder"
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"config key '{key}': directory not found: {root}")
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    if not folders:
        raise ConfigError(f"config key '{key}': {root} holds no class folders (CLASS/*.jpg)")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if not images:
            raise ConfigError(f"config key '{key}': class folder {folder} holds no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        paths += images
        labels += [label] * len(images)
    names, templates = _class_names(classes, folders)
    return ImageFolderSet(paths, labels, names, templates or load_imagenet1k()[1])


def _caption_pairs(path: Path) -> list[tuple[str, str]]:
    """``(image name, caption)`` in file order, from any of the documented formats."""
    if path.suffix.lower() == ".json":
        spec = json.loads(path.read_text())
        if isinstance(spec, dict) and isinstance(spec.get("images"), list):   # Karpathy's split file
            return [(img["filename"], s["raw"]) for img in spec["images"] if img.get("split", "test") == "test"
                    for s in img["sentences"]]
        if not isinstance(spec, dict):
            raise TypeError("the JSON must be an object {image: [captions]} or Karpathy's {'images': [...]}")
        return [(name, str(c)) for name, caps in spec.items() for c in ([caps] if isinstance(caps, str) else caps)]
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"line {number} is not IMAGE<TAB>caption: {line[:80]!r}")
        name, caption = line.split("\t", 1)
        pairs.append((name.split("#", 1)[0].strip(), caption.strip()))
    return pairs


def read_retrieval(images_dir: str, captions_file: str) -> RetrievalSet:
    key = "eval.retrieval_captions"
    base, path = Path(images_dir), Path(captions_file)
    if not base.is_dir():
        raise ConfigError(f"config key 'eval.retrieval_images': directory not found: {images_dir}")
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file not found: {captions_file}")
    try:
        pairs = _caption_pairs(path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"config key '{key}': {captions_file} is not a captions file of a documented "
                          f"format ({type(err).__name__}: {err})") from None
    if not pairs:
        raise ConfigError(f"config key '{key}': {captions_file} holds no captions")
    index: dict[str, int] = {}
    owner = [index.setdefault(name, len(index)) for name, _ in pairs]
    images = [base / name for name in index]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise ConfigError(f"config key '{key}': {captions_file} names {len(missing)} image(s) missing from "
                          f"{images_dir}, the first {missing[0]}")
    return RetrievalSet(images, [c for _, c in pairs], owner)


def check_eval_sets(cfg) -> None:
    """Read every configured evaluation set's listing; raises ConfigError on a bad one."""
    ev = cfg.eval
    if ev.imagefolder:
        read_imagefolder(ev.imagefolder, ev.imagefolder_classes)
    if bool(ev.retrieval_images) != bool(ev.retrieval_captions):
        raise ConfigError("config keys 'eval.retrieval_images' and 'eval.retrieval_captions' go together; "
                          "give both or neither")
    if ev.retrieval_images:
        read_retrieval(ev.retrieval_images, ev.retrieval_captions)


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice ``[lo, hi)`` of ``n`` items (ranks' slices in rank order,
    so gathering them in rank order gives the set's order)."""
    return n * rank // world, n * (rank + 1) // world


def image_batches(paths: list[Path], transform, batch_size: int):
    """Pixel batches ``[b, 3, H, W]`` of ``paths`` in order (an unreadable image is an error:
    skipping it would misalign labels and captions)."""
    for start in range(0, len(paths), batch_size):
        pixels = []
        for p in paths[start:start + batch_size]:
            try:
                with Image.open(p) as image:
                    pixels.append(transform(image.convert("RGB")))
            except OSError as err:
                raise ConfigError(f"evaluation image {p} cannot be read ({err})") from None
        yield torch.stack(pixels)
