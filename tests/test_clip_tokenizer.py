"""make-tokenizer: CLIP's tokenizer from the BPE vocabulary open_clip ships, as a local
transformers directory; the reference is open_clip's own tokenizer on the same texts."""
from __future__ import annotations

import gzip

import pytest
import torch

TEXTS = ["a photo of a cat.", "A RED Car, parked!! near 3 trees", "naïve café — déjà vu", "it's what we've done",
         "emoji 😀 and 中文 text", "  multiple   spaces\tand\nnewlines ", "x " * 100]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from trainer.cli import main

    out = tmp_path_factory.mktemp("clip-tokenizer")
    assert main(["make-tokenizer", "--from", "open_clip", "--out", str(out)]) == 0
    return out


def test_token_ids_equal_open_clips(clip_tokenizer):
    import open_clip

    from trainer.data import load_tokenizer

    tok = load_tokenizer(str(clip_tokenizer))
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    want = open_clip.tokenize(TEXTS)                      # [n, 77], padded with 0
    got = tok(TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    for i, text in enumerate(TEXTS):
        n = int(got["attention_mask"][i].sum())
        assert torch.equal(got["input_ids"][i, :n], want[i, :n]), text
        assert (want[i, n:] == 0).all() and (got["input_ids"][i, n:] == 49407).all(), text
    assert int(got["attention_mask"][-1].sum()) == 77 and got["input_ids"][-1, -1] == 49407   # truncated, ends in EOT


def test_bad_bpe_file_is_one_error_line(tmp_path, capsys):
    from trainer.cli import main

    assert main(["make-tokenizer", "--bpe", str(tmp_path / "missing.txt.gz"), "--out", str(tmp_path / "t")]) == 2
    assert "BPE file not found" in capsys.readouterr().err
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as fh:
        fh.write("#version\na b\n")
    assert main(["make-tokenizer", "--bpe", str(short), "--out", str(tmp_path / "t")]) == 2
    assert "does not hold CLIP's 48894 merges" in capsys.readouterr().err


@pytest.mark.parametrize("name, patch", [("vit-b-32", 32), ("vit-b-16", 16)])
def test_ready_vit_b_configs_take_the_clip_tokenizer(clip_tokenizer, name, patch):
    """The real-run configs: CLIP's shape with this tokenizer (77 tokens, its vocabulary and end
    token), the recipe's batch arithmetic, and a missing data path named before anything starts."""
    from trainer.config import ConfigError, check_world, load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_clip_config, preset_shape
    from trainer.preflight import check_run_inputs

    cfg = load_config(f"trainer/configs/{name}.yaml", [f"tokenizer.path={clip_tokenizer}"])
    shape = preset_shape(cfg.model)
    assert (shape["patch_size"], shape["context_length"], shape["vision_width"], shape["text_width"]) == (patch, 77, 768, 512)
    hf = build_clip_config(cfg.model, load_tokenizer(cfg.tokenizer.path))
    assert hf.text_config.vocab_size == 49408 and hf.text_config.eos_token_id == 49407
    assert hf.text_config.max_position_embeddings == 77
    check_world(load_config(f"trainer/configs/{name}.yaml", ["train.global_batch_size=32768"]), 128)  # 16 nodes x 8
    assert (cfg.deepspeed.precision, cfg.optim.lr, cfg.optim.warmup_steps) == ("bf16", 5e-4, 2000)
    with pytest.raises(ConfigError, match="data.train_shards"):
        check_run_inputs(cfg, 8)
