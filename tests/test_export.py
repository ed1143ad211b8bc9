"""export-hf: the exported processor truncates captions as the trainer does (its context length,
keeping the end-of-text token), and the exported model gives the trainer's text embeddings for
captions longer than the context."""
from __future__ import annotations

import pytest
import torch

from test_eval import tiny_run


@pytest.fixture(scope="module")
def exported(demo_data, tmp_path_factory):
    from trainer.data import SampleDecoder, load_tokenizer
    from trainer.export import export_hf
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config
    from trainer.model import preset_shape

    run = tiny_run(demo_data, tmp_path_factory)
    hf_dir = export_hf(str(run / "checkpoints"), str(tmp_path_factory.mktemp("hf-export") / "hf"))
    cfg, root, tag = checkpoint_config(str(run / "checkpoints"))
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    context = preset_shape(cfg.model)["context_length"]
    return {"run": run, "dir": hf_dir, "context": context, "decoder": SampleDecoder(tokenizer, context, None),
            "ours": load_trained_model(cfg, root, tag, tokenizer), "tokenizer": tokenizer}


def _captions(tokenizer) -> list[str]:
    long_one = ("a large red circle and a small blue square on a striped green background, next to a "
                "yellow triangle above a purple star in the bottom left corner of a grey picture")
    longer = " and ".join(["a blue square"] * 15)
    caps = [long_one, "a red circle", longer, "a small green star in the corner"]
    lengths = [len(tokenizer(c)["input_ids"]) for c in caps]
    assert lengths[0] >= 40 and lengths[2] >= 40, lengths   # well past the context of 24
    return caps


def test_processor_truncates_to_the_trainer_context(exported):
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(exported["dir"])
    assert processor.tokenizer.model_max_length == exported["context"] == 24
    caps = _captions(processor.tokenizer)
    got = processor(text=caps, padding=True, truncation=True, return_tensors="pt")
    want = exported["decoder"].tokenize(caps)
    width = got["input_ids"].shape[1]
    assert width == exported["context"]   # the longest captions are cut to the context
    assert torch.equal(got["input_ids"], want["input_ids"][:, :width])
    assert torch.equal(got["attention_mask"], want["attention_mask"][:, :width])
    full = processor(text=caps, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(full["input_ids"], want["input_ids"])   # max_length defaults to the context
    eos = processor.tokenizer.eos_token_id
    assert (got["input_ids"][[0, 2], -1] == eos).all()   # truncation keeps the end-of-text token


def test_exported_model_gives_trainer_text_embeddings_for_long_captions(exported):
    from transformers import CLIPModel, CLIPProcessor

    hf = CLIPModel.from_pretrained(exported["dir"]).eval()
    processor = CLIPProcessor.from_pretrained(exported["dir"])
    caps = _captions(processor.tokenizer)
    inputs = processor(text=caps, padding=True, truncation=True, return_tensors="pt")
    ours_tok = exported["decoder"].tokenize(caps)
    with torch.no_grad():
        txt_hf = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        txt_hf = getattr(txt_hf, "pooler_output", txt_hf)
        _, txt, _ = exported["ours"](input_ids=ours_tok["input_ids"], attention_mask=ours_tok["attention_mask"])
    torch.testing.assert_close(torch.nn.functional.normalize(txt_hf, dim=-1), txt, rtol=1e-5, atol=1e-5)



def test_open_clip_export_gives_the_trainers_embeddings(exported, tmp_path):
    """export-open-clip: open_clip's own loader (local-dir:, no network), tokenizer and preprocess
    give the trainer's text and image embeddings, its logit scale, and its eval pixels."""
    import open_clip
    import torch.nn.functional as F
    from PIL import Image

    from trainer.cli import main
    from trainer.config import load_config
    from trainer.data import build_transforms

    out = tmp_path / "open_clip"
    assert main(["export-open-clip", "--checkpoint", str(exported["run"] / "checkpoints"), "--out", str(out)]) == 0
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    ours = exported["ours"].eval()
    caps = _captions(exported["tokenizer"])
    cfg = load_config(exported["run"] / "config.yaml")
    image = Image.fromarray((torch.rand(80, 64, 3) * 255).to(torch.uint8).numpy())
    want_pixels = build_transforms(64, cfg.data.image_mean, cfg.data.image_std, 1.0, train=False)(image)
    torch.testing.assert_close(preprocess(image), want_pixels, atol=1e-6, rtol=0)
    pixels = torch.stack([want_pixels, torch.randn(3, 64, 64)])
    with torch.no_grad():
        ids = exported["decoder"].tokenize(caps)
        assert torch.equal(tokenizer(caps), ids["input_ids"])
        torch.testing.assert_close(F.normalize(model.encode_text(ids["input_ids"]), dim=-1),
                                   ours.encode_text(ids["input_ids"], ids["attention_mask"]), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(F.normalize(model.encode_image(pixels), dim=-1), ours.encode_image(pixels),
                                   atol=2e-5, rtol=1e-4)
        assert float(model.logit_scale.exp()) == pytest.approx(float(ours.scale()), rel=1e-6)
