"""Zero-shot classification and image-text retrieval on the validation shards, across ranks.

    result = evaluate(model, cfg, tokenizer, rank, world, device)
    # {"zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "num_samples"}

Each rank embeds its share of the validation set; top-k counts are summed across ranks and the
embeddings gathered for retrieval. Every rank runs the same number of forward passes (a rank
whose share is exhausted runs a discarded dummy batch), which ZeRO-3's parameter gathering needs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from kernels.gather import all_gather_with_grad

from . import data as D
from .config import Config, ConfigError
from .dist import all_reduce_flags
from .model import preset_shape

log = logging.getLogger("trainer")


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


def _dummy_batch(decoder: D.SampleDecoder, image_size: int) -> dict:
    return {"image": torch.zeros(1, 3, image_size, image_size), **decoder.tokenize([""]),
            "label": torch.tensor([-1])}


@torch.no_grad()
def embed_split(model, batches, dummy: dict, device, dtype):
    """Image/text embeddings and labels of this rank's share, with lockstep forwards across ranks."""
    imgs, txts, labels = [], [], []
    it = iter(batches)
    while True:
        batch = next(it, None)
        (anyone_left,) = all_reduce_flags(float(batch is not None))
        if not anyone_left:
            break
        real = batch is not None
        batch = batch if real else dummy
        img, txt, _ = model(pixel_values=batch["image"].to(device, dtype), input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device))
        if real:
            imgs.append(img.float())
            txts.append(txt.float())
            labels.append(batch["label"].to(device))
    def cat(parts, dtype=torch.float32, width=(model.config.projection_dim,)):
        return torch.cat(parts) if parts else torch.zeros((0, *width), dtype=dtype, device=device)
    return cat(imgs), cat(txts), cat(labels, torch.long, ())


def recall_at(sim: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Row i's match is column i; R@k = fraction of rows whose match ranks in the top k."""
    target = sim.diagonal().unsqueeze(1)
    rank = (sim > target).sum(1)  # number of columns scoring strictly higher than the match
    return {k: (rank < k).float().mean().item() for k in ks}


def evaluate(model, cfg: Config, tokenizer, rank: int, world: int, device) -> dict:
    shape = preset_shape(cfg.model)
    transform = D.build_transforms(shape["image_size"], cfg.data.image_mean, cfg.data.image_std, 1.0, train=False)
    decoder = D.SampleDecoder(tokenizer, shape["context_length"], transform)
    urls = D.expand_shards(cfg.data.val_shards, "data.val_shards")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    img, txt, labels = embed_split(model, D.eval_batches(urls, decoder, cfg.eval.batch_size, rank, world),
                                   _dummy_batch(decoder, shape["image_size"]), device, dtype)
    result: dict = {}
    if cfg.eval.zeroshot:
        classnames, templates = load_zeroshot(cfg.eval.zeroshot)
        classifier = zeroshot_classifier(model, decoder, classnames, templates, device)
        top5 = (img @ classifier.T).topk(min(5, len(classnames)), dim=1).indices
        valid = labels >= 0
        hits = torch.tensor([float((top5[:, 0] == labels)[valid].sum()), float((top5 == labels[:, None]).any(1)[valid].sum()),
                             float(valid.sum())], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(hits)
        result.update(zeroshot_top1=hits[0].item() / max(1, hits[2].item()),
                      zeroshot_top5=hits[1].item() / max(1, hits[2].item()))
    all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
    sim = all_img @ all_txt.T
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        for k, v in recall_at(s).items():
            result[f"{direction}_r{k}"] = v
    result["num_samples"] = all_img.shape[0]
    model.train(was_training)
    return result
