"""Zero-shot classification and image-text retrieval on the validation shards, across ranks.

    result = evaluate(model, cfg, tokenizer, rank, world, device)
    # {"zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "num_samples"}

Each rank embeds its share of the validation set; top-k counts are summed across ranks. For
retrieval the embeddings are gathered (``[N, D]``, never the ``N x N`` similarity matrix): each
rank ranks its own images against all texts and its own texts against all images, in blocks of
at most ``RETRIEVAL_BLOCK_ROWS`` rows, so a rank holds at most ``block x N`` scores at a time, and
the hit counts are summed across ranks. Ties count against the model: a query's match ranks below
every other candidate with an equal score (repeated captions do not inflate R@k).

Two more sets read from local files (trainer/eval_sets.py), each rank embedding its contiguous
share: ``eval.imagefolder`` (zero-shot ``imagefolder/top1``, ``imagefolder/top5``) and
``eval.retrieval_images`` + ``eval.retrieval_captions`` (``retrieval/i2t_r1`` ... with several
captions per image: :func:`multi_caption_recall`).

A stop signal (SLURM's SIGUSR1 before the time limit, SIGTERM on preemption) need not wait for
the evaluation to finish: ``should_stop`` is polled at every forward, the ranks agree in the
all-reduce each forward makes anyway, and every rank raises :class:`StopRequested` at the same
forward; the run then checkpoints and exits (trainer/train.py).

Every rank runs the same number of forward passes (a rank whose share is exhausted runs a
discarded dummy batch), which ZeRO-3's parameter gathering needs. Every collective goes through
``trainer.dist`` (tensors moved to the backend's communication device: NCCL needs CUDA tensors)
or the kernels' ``all_gather_with_grad`` (whose tensors are the embeddings, on the model device).
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from kernels.gather import all_gather_with_grad, gathered_layout

from . import data as D
from .config import Config, ConfigError
from .dist import all_reduce, all_reduce_flags, from_rank0
from .eval_sets import image_batches, read_imagefolder, read_retrieval, share
from .faults import StopRequested
from .methods import eval_views, keep_rate
from .model import preset_shape

log = logging.getLogger("trainer")
RECALL_KS = (1, 5, 10)
COUNT_KEYS = ("num_samples", "num_images", "num_captions")   # the same in every view: plain keys only
RETRIEVAL_BLOCK_ROWS = 1024  # query rows scored at once: a rank holds at most this many x N scores


def load_zeroshot(path: str) -> tuple[list[str], list[str]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'eval.zeroshot': file not found: {path}")
    try:
        spec = json.loads(p.read_text())
        classnames, templates = list(spec["classnames"]), list(spec["templates"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"config key 'eval.zeroshot': {path} must be JSON with 'classnames' and "
                          f"'templates' lists ({type(err).__name__}: {err})") from None
    if not classnames or not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"config key 'eval.zeroshot': {path} needs non-empty classnames and templates "
                          "that each contain '{}'")
    return classnames, templates


@functools.lru_cache(maxsize=4)
def prompt_tokens(tokenizer, context_length: int, classnames: tuple[str, ...],
                  templates: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], ...]:
    """Per class, its prompts ``template.format(name)`` tokenized as the trainer does (int32).

    The one part of a zero-shot classifier that is constant over a run (the text tower trains, so
    the embeddings are not): tokenized once per run and set, not at every evaluation. ImageNet's
    80,000 prompts took 26 s to tokenize on a loaded 2-core machine, where the text tower's
    forward over them is a few seconds on a GPU (by its FLOPs); held as int32, about 50 MB.
    """
    decoder = D.SampleDecoder(tokenizer, context_length, None)
    return tuple({k: v.to(torch.int32) for k, v in decoder.tokenize([t.format(name) for t in templates]).items()}
                 for name in classnames)


@torch.no_grad()
def zeroshot_classifier(model, decoder: D.SampleDecoder, classnames, templates, device) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompts' normalised text embeddings."""
    weights = []
    for tok in prompt_tokens(decoder.tokenizer, decoder.context_length, tuple(classnames), tuple(templates)):
        emb = model.encode_text(tok["input_ids"].to(device, torch.long), tok["attention_mask"].to(device, torch.long)).float()
        weights.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def embed_lockstep(model, batches, dummy: dict, device, dtype, should_stop=None,
                   pixels=D.to_model_pixels) -> dict:
    """This rank's embeddings of ``batches``, with the same number of forwards on every rank (a rank
    whose share is exhausted runs ``dummy`` and discards it), as ZeRO-3's parameter gathering needs.

    A batch holds ``"image"`` pixels, ``"input_ids"`` + ``"attention_mask"``, or both (pairs), and
    optionally ``"label"``. Returns ``{"image": [n, D], "text": [n, D], "label": [n], "scale"}``
    (a modality the batches lack: ``[0, D]``; ``scale``: the model's logit scale, None for a view
    without one). ``should_stop()`` true on any rank raises :class:`StopRequested` on every rank.
    ``pixels``: how images become the model's input (``D.model_pixels(cfg)`` normalises the decoders'
    uint8 images on the device).

        out = embed_lockstep(model, ({"image": x} for x in pixel_batches), {"image": zeros}, device, dtype)
    """
    parts: dict[str, list] = {"image": [], "text": [], "label": []}
    scale, it = None, iter(batches)
    while True:
        batch = next(it, None)
        anyone_left, stop = all_reduce_flags(float(batch is not None), float(bool(should_stop and should_stop())))
        if stop:
            raise StopRequested
        if not anyone_left:
            break
        real = batch is not None
        batch = batch if real else dummy
        inputs = {}
        if "image" in batch:
            inputs["pixel_values"] = pixels(batch["image"], device, dtype)
        if "input_ids" in batch:
            inputs.update(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        img, txt, scale = model(**inputs)
        if real:
            for key, emb in (("image", img), ("text", txt)):
                if emb is not None:
                    parts[key].append(emb.float())
            if "label" in batch:
                parts["label"].append(batch["label"].to(device))

    def cat(key, dtype=torch.float32, width=(model.config.projection_dim,)):
        return torch.cat(parts[key]) if parts[key] else torch.zeros((0, *width), dtype=dtype, device=device)
    return {"image": cat("image"), "text": cat("text"), "label": cat("label", torch.long, ()),
            "scale": None if scale is None else float(scale)}


def embed_split(model, batches, dummy: dict, device, dtype, should_stop=None, pixels=D.to_model_pixels):
    """``(image [n, D], text [n, D], labels [n], logit scale)`` of this rank's validation pairs:
    :func:`embed_lockstep` on batches holding both modalities and ``label``."""
    out = embed_lockstep(model, batches, dummy, device, dtype, should_stop, pixels)
    return out["image"], out["text"], out["label"], out["scale"]


def embed_images(model, paths: list[Path], decoder: D.SampleDecoder, batch_size: int, image_size: int,
                 device, dtype, should_stop=None, pixels=D.to_model_pixels) -> torch.Tensor:
    """``[n, D]`` image embeddings of ``paths`` (this rank's share of a file set): :func:`embed_lockstep`."""
    batches = ({"image": x} for x in image_batches(paths, decoder.transform, batch_size))
    dummy = {"image": torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)}
    return embed_lockstep(model, batches, dummy, device, dtype, should_stop, pixels)["image"]


@torch.no_grad()
def retrieval_hits(queries: torch.Tensor, keys: torch.Tensor, offset: int, ks=RECALL_KS,
                   block_rows: int | None = None) -> torch.Tensor:
    """Hit counts ``[len(ks)]`` (float64, CPU) of ``queries`` ``[b, D]`` against ``keys`` ``[N, D]``.

    Query ``i``'s match is key ``offset + i``; its rank is the number of *other* keys scoring at
    least as high (ties count against the model), and it is a hit at ``k`` when that rank is
    below ``k``. Scored ``block_rows`` (default ``RETRIEVAL_BLOCK_ROWS``) queries at a time: at
    most ``block_rows x N`` scores exist.
    """
    block_rows = max(1, block_rows or RETRIEVAL_BLOCK_ROWS)
    n = keys.shape[0]
    hits = torch.zeros(len(ks), dtype=torch.float64)
    keys_t = keys.T
    for start in range(0, queries.shape[0], block_rows):
        block = queries[start:start + block_rows]
        rows = torch.arange(block.shape[0], device=block.device)
        cols = rows + (offset + start)
        sim = block @ keys_t                              # [B, N]
        target = sim[rows, cols]                          # a copy (advanced indexing)
        sim[rows, cols] = float("-inf")                   # the match itself does not count
        rank = (sim >= target[:, None]).sum(1)
        rank = torch.where(torch.isnan(target), torch.full_like(rank, n), rank)  # a NaN score never hits
        hits += torch.stack([(rank < k).sum() for k in ks]).to("cpu", torch.float64)
        del sim
    return hits


@torch.no_grad()
def val_loss(img: torch.Tensor, txt: torch.Tensor, scale: float, block_rows: int | None = None) -> float:
    """The symmetric contrastive loss over the whole validation set as one batch (every rank's
    pairs are each other's negatives), at the model's logit scale: ``(CE(i->t) + CE(t->i)) / 2``
    averaged over pairs; rows scored ``block_rows`` at a time. The same on every rank."""
    block_rows = max(1, block_rows or RETRIEVAL_BLOCK_ROWS)
    offset, sizes = gathered_layout(img.shape[0], device=img.device)
    all_img, all_txt = all_gather_with_grad(img, sizes=sizes), all_gather_with_grad(txt, sizes=sizes)
    total = torch.zeros((), dtype=torch.float64, device=img.device)
    for queries, keys in ((img, all_txt), (txt, all_img)):
        for start in range(0, queries.shape[0], block_rows):
            logits = scale * queries[start:start + block_rows] @ keys.T
            target = torch.arange(start, start + logits.shape[0], device=logits.device) + offset
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double()
    return all_reduce(total, "sum").item() / (2 * max(1, sum(sizes)))


@torch.no_grad()
def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, ks=RECALL_KS,
                     block_rows: int | None = None) -> dict:
    """Image->text and text->image R@k over every rank's pairs, from this rank's ``[b, D]`` pairs.

    Returns ``{"i2t_r1": ..., "t2i_r1": ..., "num_samples": N}``; the same on every rank.
    """
    offset, sizes = gathered_layout(img.shape[0], device=img.device)  # this rank's rows sit at offset
    n = sum(sizes)
    all_img = all_gather_with_grad(img, sizes=sizes)
    all_txt = all_gather_with_grad(txt, sizes=sizes)
    hits = torch.cat([retrieval_hits(img, all_txt, offset, ks, block_rows),    # i2t: my images, all texts
                      retrieval_hits(txt, all_img, offset, ks, block_rows)])   # t2i: my texts, all images
    hits = all_reduce(hits, "sum")
    result = {}
    for d, direction in enumerate(("i2t", "t2i")):
        for j, k in enumerate(ks):
            result[f"{direction}_r{k}"] = hits[d * len(ks) + j].item() / max(1, n)
    result["num_samples"] = n
    return result


def imagefolder_accuracy(model, cfg: Config, decoder: D.SampleDecoder, rank: int, world: int, device, dtype,
                         image_size: int, should_stop=None) -> dict:
    """Zero-shot top-1/top-5 on ``eval.imagefolder`` (trainer/eval_sets.py): each rank embeds its
    contiguous share of the images; the hit counts are summed across ranks."""
    # listed by rank 0 for all: one listing, and every rank splits the same list
    folder = from_rank0(lambda: read_imagefolder(cfg.eval.imagefolder, cfg.eval.imagefolder_classes))
    lo, hi = share(len(folder.paths), rank, world)
    img = embed_images(model, folder.paths[lo:hi], decoder, cfg.eval.batch_size, image_size, device, dtype, should_stop,
                       D.model_pixels(cfg))
    classifier = zeroshot_classifier(model, decoder, folder.classnames, folder.templates, device)
    labels = torch.tensor(folder.labels[lo:hi], dtype=torch.long, device=device)
    topk = (img @ classifier.T).topk(min(5, len(folder.classnames)), dim=1).indices    # [b, k]
    hits = torch.tensor([float((topk[:, 0] == labels).sum()), float((topk == labels[:, None]).any(1).sum())],
                        dtype=torch.float64)
    hits = all_reduce(hits, "sum")
    n = len(folder.paths)
    return {"imagefolder/top1": hits[0].item() / n, "imagefolder/top5": hits[1].item() / n,
            "imagefolder/num_samples": n}


@torch.no_grad()
def multi_caption_recall(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks=RECALL_KS,
                         block_rows: int | None = None) -> dict:
    """R@k of a set whose images have several captions, from this rank's contiguous shares of the
    images ``[b_i, D]`` and captions ``[b_t, D]``; ``owner`` ``[T]``: the image of every caption.

    Image->text: a hit at ``k`` when one of the image's captions ranks below ``k`` among the
    captions of *other* images (its best caption's rank; ties count against the model).
    Text->image: the rank of the caption's image among the other images, as :func:`retrieval_hits`.
    """
    block_rows = max(1, block_rows or RETRIEVAL_BLOCK_ROWS)
    img_offset, img_sizes = gathered_layout(img.shape[0], device=img.device)
    txt_offset, txt_sizes = gathered_layout(txt.shape[0], device=txt.device)
    all_img, all_txt = all_gather_with_grad(img, sizes=img_sizes), all_gather_with_grad(txt, sizes=txt_sizes)
    owner = owner.to(img.device)
    hits = torch.zeros(2 * len(ks), dtype=torch.float64)
    for start in range(0, img.shape[0], block_rows):
        sim = img[start:start + block_rows] @ all_txt.T                               # [B, T]
        mine = torch.arange(sim.shape[0], device=sim.device) + img_offset + start
        owned = owner[None, :] == mine[:, None]
        best = sim.masked_fill(~owned, float("-inf")).amax(1)
        rank = ((sim >= best[:, None]) & ~owned).sum(1)
        rank = torch.where(torch.isnan(best), torch.full_like(rank, sum(txt_sizes)), rank)
        hits[:len(ks)] += torch.stack([(rank < k).sum() for k in ks]).to("cpu", torch.float64)
    for start in range(0, txt.shape[0], block_rows):
        sim = txt[start:start + block_rows] @ all_img.T                               # [B, I]
        rows = torch.arange(sim.shape[0], device=sim.device)
        cols = owner[rows + txt_offset + start]
        target = sim[rows, cols]                                                      # a copy
        sim[rows, cols] = float("-inf")                                               # the match itself
        rank = (sim >= target[:, None]).sum(1)
        rank = torch.where(torch.isnan(target), torch.full_like(rank, sum(img_sizes)), rank)
        hits[len(ks):] += torch.stack([(rank < k).sum() for k in ks]).to("cpu", torch.float64)
    hits = all_reduce(hits, "sum")
    n_img, n_txt = sum(img_sizes), sum(txt_sizes)
    result = {f"retrieval/i2t_r{k}": hits[j].item() / max(1, n_img) for j, k in enumerate(ks)}
    result.update({f"retrieval/t2i_r{k}": hits[len(ks) + j].item() / max(1, n_txt) for j, k in enumerate(ks)})
    return {**result, "retrieval/num_images": n_img, "retrieval/num_captions": n_txt}


def retrieval_set_recall(model, cfg: Config, decoder: D.SampleDecoder, rank: int, world: int, device, dtype,
                         image_size: int, should_stop=None) -> dict:
    """:func:`multi_caption_recall` on ``eval.retrieval_images`` / ``eval.retrieval_captions``."""
    pairs = from_rank0(lambda: read_retrieval(cfg.eval.retrieval_images, cfg.eval.retrieval_captions))
    bs = cfg.eval.batch_size
    lo, hi = share(len(pairs.images), rank, world)
    img = embed_images(model, pairs.images[lo:hi], decoder, bs, image_size, device, dtype, should_stop,
                       D.model_pixels(cfg))
    lo, hi = share(len(pairs.captions), rank, world)
    mine = pairs.captions[lo:hi]
    txt = embed_lockstep(model, (decoder.tokenize(mine[s:s + bs]) for s in range(0, len(mine), bs)),
                         decoder.tokenize([""]), device, dtype, should_stop)["text"]
    return multi_caption_recall(img, txt, torch.tensor(pairs.owner, dtype=torch.long))


def evaluate(model, cfg: Config, tokenizer, rank: int, world: int, device, should_stop=None) -> dict:
    shape = preset_shape(cfg.model)
    decoder = D.eval_decoder(cfg, tokenizer)
    urls = D.shard_list(cfg.data.val_shards, "data.val_shards")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        img, txt, labels, scale = embed_split(model, D.eval_batches(urls, decoder, cfg.eval.batch_size, rank, world,
                                                                   cfg.data.workers, cfg.data.worker_start),
                                              D.dummy_batch(decoder, shape["image_size"]), device, dtype, should_stop,
                                              D.model_pixels(cfg))
        extra: dict = {}
        for wanted, run in ((cfg.eval.imagefolder, imagefolder_accuracy), (cfg.eval.retrieval_images, retrieval_set_recall)):
            if wanted:
                extra.update(run(model, cfg, decoder, rank, world, device, dtype, shape["image_size"], should_stop))
    except StopRequested:
        model.train(was_training)
        raise
    result: dict = {}
    if cfg.eval.zeroshot:
        classnames, templates = load_zeroshot(cfg.eval.zeroshot)
        classifier = zeroshot_classifier(model, decoder, classnames, templates, device)
        top5 = (img @ classifier.T).topk(min(5, len(classnames)), dim=1).indices
        valid = labels >= 0
        hits = torch.tensor([float((top5[:, 0] == labels)[valid].sum()), float((top5 == labels[:, None]).any(1)[valid].sum()),
                             float(valid.sum())], dtype=torch.float64)
        hits = all_reduce(hits, "sum")
        result.update(zeroshot_top1=hits[0].item() / max(1, hits[2].item()),
                      zeroshot_top5=hits[1].item() / max(1, hits[2].item()))
    result.update(retrieval_recall(img, txt))
    if scale is not None:
        result["val_loss"] = val_loss(img, txt, scale)
    result.update(extra)
    model.train(was_training)
    return result


def evaluate_all(model, cfg: Config, tokenizer, rank: int, world: int, device, should_stop=None) -> dict:
    """:func:`evaluate` for every view the enabled methods define: the model as trained (the plain
    keys; an ECLIPSE student at full capacity), the expedited student (``fast/...``) and the
    momentum teacher (``teacher/...``). ``should_stop``: see :func:`embed_lockstep`."""
    result: dict = {}
    for prefix, view, rate in eval_views(model, cfg):
        with keep_rate(model, rate):
            one = evaluate(view, cfg, tokenizer, rank, world, device, should_stop)
        result.update({prefix + k: v for k, v in one.items() if not (prefix and k.endswith(COUNT_KEYS))})
    return result
