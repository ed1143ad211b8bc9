"""Zero-shot classification and image-text retrieval on the validation shards, across ranks.

    result = evaluate(model, cfg, tokenizer, rank, world, device)
    # {"zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "num_samples"}

Each rank embeds its share of the validation set; top-k counts are summed across ranks. For
retrieval the embeddings are gathered (``[N, D]``, never the ``N x N`` similarity matrix): each
rank ranks its own images against all texts and its own texts against all images, in blocks of
at most ``RETRIEVAL_BLOCK_ROWS`` rows, so a rank holds at most ``block x N`` scores at a time, and
the hit counts are summed across ranks. Ties count against the model: a query's match ranks below
every other candidate with an equal score (repeated captions do not inflate R@k).

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

import json
import logging
from pathlib import Path

import torch

from kernels.gather import all_gather_with_grad, gathered_layout

from . import data as D
from .config import Config, ConfigError
from .dist import all_reduce, all_reduce_flags
from .faults import StopRequested
from .methods import eval_views, keep_rate
from .model import preset_shape

log = logging.getLogger("trainer")
RECALL_KS = (1, 5, 10)
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


@torch.no_grad()
def zeroshot_classifier(model, decoder: D.SampleDecoder, classnames, templates, device) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompts' normalised text embeddings."""
    weights = []
    for name in classnames:
        tok = decoder.tokenize([t.format(name) for t in templates])
        emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
        weights.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def embed_split(model, batches, dummy: dict, device, dtype, should_stop=None):
    """Image/text embeddings and labels of this rank's share, with lockstep forwards across ranks,
    and the model's logit scale (None for a view without one). ``should_stop()`` true on any rank
    raises :class:`StopRequested` on every rank."""
    imgs, txts, labels, scale = [], [], [], None
    it = iter(batches)
    while True:
        batch = next(it, None)
        anyone_left, stop = all_reduce_flags(float(batch is not None), float(bool(should_stop and should_stop())))
        if stop:
            raise StopRequested
        if not anyone_left:
            break
        real = batch is not None
        batch = batch if real else dummy
        img, txt, scale = model(pixel_values=batch["image"].to(device, dtype),
                                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        if real:
            imgs.append(img.float())
            txts.append(txt.float())
            labels.append(batch["label"].to(device))
    def cat(parts, dtype=torch.float32, width=(model.config.projection_dim,)):
        return torch.cat(parts) if parts else torch.zeros((0, *width), dtype=dtype, device=device)
    return cat(imgs), cat(txts), cat(labels, torch.long, ()), None if scale is None else float(scale)


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


def evaluate(model, cfg: Config, tokenizer, rank: int, world: int, device, should_stop=None) -> dict:
    shape = preset_shape(cfg.model)
    decoder = D.eval_decoder(cfg, tokenizer)
    urls = D.expand_shards(cfg.data.val_shards, "data.val_shards")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        img, txt, labels, scale = embed_split(model, D.eval_batches(urls, decoder, cfg.eval.batch_size, rank, world),
                                              D.dummy_batch(decoder, shape["image_size"]), device, dtype, should_stop)
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
    model.train(was_training)
    return result


def evaluate_all(model, cfg: Config, tokenizer, rank: int, world: int, device, should_stop=None) -> dict:
    """:func:`evaluate` for every view the enabled methods define: the model as trained (the plain
    keys; an ECLIPSE student at full capacity), the expedited student (``fast/...``) and the
    momentum teacher (``teacher/...``). ``should_stop``: see :func:`embed_split`."""
    result: dict = {}
    for prefix, view, rate in eval_views(model, cfg):
        with keep_rate(model, rate):
            one = evaluate(view, cfg, tokenizer, rank, world, device, should_stop)
        result.update({prefix + k: v for k, v in one.items() if not (prefix and k == "num_samples")})
    return result
