"""CLIP's tokenizer as a local ``transformers`` directory, written from the BPE vocabulary the
open_clip package ships (``bpe_simple_vocab_16e6.txt.gz``; nothing is downloaded).

    python -m trainer make-tokenizer --from open_clip --out tokenizers/clip
    # then: tokenizer.path=tokenizers/clip  model.context_length=77

The vocabulary is built the way open_clip's ``SimpleTokenizer`` builds it: the 256 byte symbols,
the same with the end-of-word mark ``</w>``, the first 48,894 merges, then the start and end
tokens: 49,408 ids, the start token 49406 and the end token 49407 (``<|startoftext|>`` and
``<|endoftext|>``, the names OpenAI's ``transformers`` CLIP checkpoints use). Padding uses the end
token, as in those checkpoints; the attention mask marks it. ``AutoTokenizer`` loads the directory
as ``CLIPTokenizerFast`` and gives open_clip's token ids for the same text (tests/test_clip_tokenizer.py).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from .config import ConfigError

CONTEXT_LENGTH = 77
N_MERGES = 49152 - 256 - 2   # open_clip's SimpleTokenizer: merges[1:49152-256-2+1]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (the BPE's base symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe() -> Path:
    """The BPE file of the installed open_clip package."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError("make-tokenizer --from open_clip: the open_clip package is not installed "
                          "(pip install open_clip_torch), or give --bpe PATH") from None
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def read_merges(bpe: Path) -> list[tuple[str, str]]:
    if not bpe.is_file():
        raise ConfigError(f"make-tokenizer: BPE file not found: {bpe}")
    try:
        lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"make-tokenizer: {bpe} is not a gzipped BPE merges file ({err})") from None
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ConfigError(f"make-tokenizer: {bpe} does not hold CLIP's {N_MERGES} merges "
                          f"(found {len(merges)} lines after the header, or a line that is not a pair)")
    return merges


def write_clip_tokenizer(out: str | Path, bpe: str | Path | None = None) -> dict:
    """Write ``vocab.json``, ``merges.txt`` and the configs of a CLIPTokenizer to ``out``; returns
    a summary. ``bpe``: the merges file (default: the installed open_clip's)."""
    merges = read_merges(Path(bpe) if bpe else open_clip_bpe())
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [BOS, EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps(encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
                                               "unk_token": EOS}, indent=2),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH,
                                             "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
                                             "do_lower_case": True, "errors": "replace"}, indent=2),
    }
    for name, text in files.items():   # each file whole or absent
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    # the fast (Rust) tokenizer's tokenizer.json too, so data loaders do not run the Python BPE
    from transformers import CLIPTokenizerFast

    fast = CLIPTokenizerFast.from_pretrained(str(out), local_files_only=True)
    fast.model_max_length = CONTEXT_LENGTH
    tmp = out / ".fast"
    fast.save_pretrained(str(tmp))
    os.replace(tmp / "tokenizer.json", out / "tokenizer.json")
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()
    return {"out": str(out), "vocab_size": len(encoder), "bos_token_id": encoder[BOS],
            "eos_token_id": encoder[EOS], "context_length": CONTEXT_LENGTH}
