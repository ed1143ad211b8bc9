"""docs/your-data.md cannot drift from the code: every `python -m trainer` command in it parses
with the real command line, the files it names exist, and its tiny block runs end to end."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "your-data.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_every_trainer_command_parses_and_every_named_file_exists():
    from trainer.cli import build_parser

    text = GUIDE.read_text()
    seen = 0
    for block in bash_blocks(text):
        for argv in commands(block):
            if argv[:3] == ["python", "-m", "trainer"]:
                args = argv[3:]
            elif argv[:1] == ["torchrun"] and "trainer" in argv:
                args = argv[argv.index("trainer") + 1:]
            else:
                continue
            build_parser().parse_args(args)   # SystemExit(2) on an unknown verb or flag
            seen += 1
            if "--config" in args:
                assert (ROOT / args[args.index("--config") + 1]).is_file(), args
    assert seen >= 8
    for link in re.findall(r"\]\(((?:\.\./)?[\w/.-]+\.(?:md|yaml))(?:#[\w-]+)?\)", text):
        assert (GUIDE.parent / link).is_file(), link


@pytest.mark.full
def test_the_tiny_block_runs_end_to_end(tmp_path):
    text = GUIDE.read_text()
    block = text.split("<!-- tests/test_guide.py runs this block -->", 1)[1]
    (tmp_path / "trainer").symlink_to(ROOT / "trainer")   # the guide's relative config paths
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for argv in commands(bash_blocks(block)[0]):
        if argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        elif argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (argv, proc.stdout[-3000:], proc.stderr[-3000:])
    run = tmp_path / "guide" / "run"
    history = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]
    final = json.loads((run / "eval-final.json").read_text())
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "val_loss"):
        assert final[key] == pytest.approx(history[-1][key], abs=1e-5), key
    from transformers import AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(run / "hf")
    assert model.config.text_config.vocab_size == 49408
    assert len(AutoTokenizer.from_pretrained(run / "hf")) == 49408
