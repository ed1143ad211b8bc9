"""CLIP pre-training with DeepSpeed ZeRO: train, make-demo-data, make-tokenizer, eval, export-hf, export-open-clip, select, grow, sweep, bench, convert-manifest.

``python -m trainer VERB ...``. User mistakes (bad config, missing paths, bad batch arithmetic)
print one ``error:`` line and exit with status 2, before any process group or data loader starts.

The command line is the top layer (docs/development.md): it may import any module, and it
imports a verb's modules only when that verb runs (inside its handler), so that ``--help`` and
``make-demo-data`` start without loading DeepSpeed, ``transformers`` and the methods.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, describe, load_config


def _train(args) -> int:
    from . import data as D
    from .dist import launch_env
    from .preflight import check_run_inputs
    from .sources import apply_pretrained_shape, check_init_tokenizer

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={'auto' if args.resume == 'latest' else args.resume}")
    cfg = load_config(args.config, overrides)
    apply_pretrained_shape(cfg)   # a transformers / open_clip checkpoint.init sets the shape (and tokenizer)
    le = launch_env()
    _check_resume(cfg, le.world_size)   # sets train.grad_accum_steps to keep a checkpoint's global batch
    check_run_inputs(cfg, le.world_size)
    tokenizer = D.load_tokenizer(cfg.tokenizer.path)
    check_init_tokenizer(cfg, tokenizer)
    if cfg.loss.impl == "triton":
        _require_triton()
    _check_precision(cfg)
    from .train import run
    return run(cfg, le, tokenizer)


def _require_triton() -> None:
    import torch
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("config key 'loss.impl' is 'triton' but there is no GPU; use chunked or auto "
                          "(or set TRITON_INTERPRET=1 to run the kernels in Triton's slow interpreter)")


def _check_resume(cfg, world_size: int) -> None:
    from pathlib import Path

    from .checkpoint import apply_plan, requeued, resume_plan

    latest = Path(cfg.output_dir) / "checkpoints" / "latest"
    if cfg.checkpoint.resume == "none" and latest.is_file() and not requeued():
        raise ConfigError(f"checkpoint.resume is 'none' but {latest.parent} already holds checkpoints; "
                          "use a new output_dir, or resume with --resume latest")
    # A path that is not a complete checkpoint, or a global batch this world cannot keep, is a
    # ConfigError here, before any process group; the run itself acts on rank 0's plan.
    apply_plan(cfg, resume_plan(cfg, world_size))


def _check_precision(cfg) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if cfg.deepspeed.precision == "fp16" and not acc.is_fp16_supported():
        raise ConfigError(f"config key 'deepspeed.precision' is fp16, which DeepSpeed's {acc.device_name()} "
                          "accelerator does not support; use bf16 or fp32")
    slow_on_cpu = {"bf16": "without bf16 units (most CPUs) its matmuls run far slower than fp32",
                   "fp16": "DeepSpeed accepts it where oneDNN has fp16 kernels, but the demo config's step "
                           "ran 2.4x slower than in fp32 on such a CPU (a Xeon with AVX512-FP16)"}
    if cfg.deepspeed.precision in slow_on_cpu and acc.device_name() == "cpu":
        import logging
        logging.getLogger("trainer").warning(
            f"deepspeed.precision={cfg.deepspeed.precision} on CPU: {slow_on_cpu[cfg.deepspeed.precision]}; "
            "trainer/configs/demo.yaml uses fp32")


def _make_demo_data(args) -> int:
    from .demo_data import make_demo_data
    try:
        summary = make_demo_data(args.out, num_train=args.num_train, num_val=args.num_val,
                                 noise_rate=args.noise_rate, seed=args.seed, num_text=args.num_text)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _make_tokenizer(args) -> int:
    from .clip_tokenizer import write_clip_tokenizer
    print(json.dumps(write_clip_tokenizer(args.out, args.bpe), indent=2))
    return 0


def _eval(args) -> int:
    from .data import load_tokenizer
    from .dist import init_distributed, launch_env, shutdown
    from .eval_sets import check_eval_sets
    from .evaluate import evaluate_all
    from .methods import load_trained_model
    from .sources import checkpoint_config, step_of

    cfg, root, tag = checkpoint_config(args.checkpoint, args.overrides)
    if not cfg.data.val_shards:
        raise ConfigError("config key 'data.val_shards' is empty; nothing to evaluate on")
    check_eval_sets(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    le = launch_env()
    device = init_distributed(le, cfg.dist.backend, cfg.dist.timeout_s) if le.world_size > 1 else _device()
    model = load_trained_model(cfg, root, tag, tokenizer).to(device)
    result = evaluate_all(model, cfg, tokenizer, le.rank, le.world_size, device)
    result["step"] = step_of(root, tag)
    if le.rank == 0:
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
    shutdown()
    return 0


def _convert_manifest(args) -> int:
    from pathlib import Path

    from .data import convert_key_manifest, expand_shards

    if not Path(args.manifest).is_file():
        raise ConfigError(f"convert-manifest --manifest: file not found: {args.manifest}")
    urls = expand_shards(args.shards, "--shards")
    print(json.dumps(convert_key_manifest(args.manifest, urls, args.out), indent=2))
    return 0


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _export(args) -> int:
    from .export import export_hf
    out = export_hf(args.checkpoint, args.out, which=args.which)
    print(out)
    return 0


def _export_open_clip(args) -> int:
    from .export import export_open_clip
    print(export_open_clip(args.checkpoint, args.out, which=args.which))
    return 0


def _bench(args) -> int:
    import importlib
    if args.what not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {args.what!r}; available: {', '.join(BENCHMARKS)}")
    module = "kernels.bench" if args.what == "loss" else f"trainer.experiments.bench_{args.what}"
    return importlib.import_module(module).main(args.rest) or 0


def _select(args) -> int:
    from .select import main as select_main
    return select_main(args)


def _grow(args) -> int:
    if args.search is not None:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        from .experiments.growth_search import search
        return search(args, args.overrides)
    from .grow import main as grow_main
    return grow_main(args)


def _sweep(args) -> int:
    from .experiments.sweep import run_sweep
    return run_sweep(args)


BENCHMARKS = {
    "loss": "the fused contrastive loss against open_clip's ClipLoss and the torch reference (time, memory)",
    "train": "training steps/s: open_clip's step, a bare torch loop and ours (and the methods), side by side",
    "expedite": "EViT / patch-dropout image-tower inference speed at each keep rate",
    "select": "ECL selection at scale: merge time and loader-worker memory against the number of keys",
    "growth": "GrowCLIP's report: accuracy against training FLOPs of grown and ungrown runs",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train (resumes automatically from output_dir's latest checkpoint)")
    t.add_argument("--config", help="YAML config, e.g. trainer/configs/demo.yaml")
    t.add_argument("--resume", help="'latest' (default when output_dir holds a checkpoint) or 'none'")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    # The `deepspeed` launcher appends --local_rank=N; the rank comes from the environment anyway.
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    m = sub.add_parser("make-demo-data", help="write the synthetic demo data set")
    m.add_argument("--out", required=True)
    m.add_argument("--num-train", type=int, default=10000)
    m.add_argument("--num-val", type=int, default=1000)
    m.add_argument("--num-text", type=int, default=4000)
    m.add_argument("--noise-rate", type=float, default=0.0)
    m.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("make-tokenizer", help="write CLIP's tokenizer (transformers CLIPTokenizer, 77 tokens) "
                                              "from the BPE vocabulary open_clip ships; no download")
    k.add_argument("--from", dest="source", choices=("open_clip",), default="open_clip",
                   help="where the BPE vocabulary comes from (the installed open_clip package)")
    k.add_argument("--bpe", help="a bpe_simple_vocab_16e6.txt.gz to use instead of the installed open_clip's")
    k.add_argument("--out", required=True, help="the tokenizer directory (then tokenizer.path=DIR)")
    e = sub.add_parser("eval", help="zero-shot and retrieval evaluation of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", help="also write the result JSON here")
    e.add_argument("overrides", nargs="*")
    x = sub.add_parser("export-hf", help="write a transformers CLIPModel/CLIPProcessor directory")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--which", choices=("student", "teacher"), default="student",
                   help="image tower to export: the trained one, or ECLIPSE's momentum teacher (shared text tower)")
    o = sub.add_parser("export-open-clip", help="write an open_clip directory (open_clip's local-dir: loader, "
                                                "clip_benchmark) from a checkpoint; no network needed to load it")
    o.add_argument("--checkpoint", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--which", choices=("student", "teacher"), default="student",
                   help="image tower to export: the trained one, or ECLIPSE's momentum teacher (shared text tower)")
    s = sub.add_parser("sweep", help="train every (variant, seed) of a variants file; table and plots")
    s.add_argument("--config", required=True, help="base config (YAML)")
    s.add_argument("--variants", required=True, help="YAML: {name: {key: value, ...}, ..., seeds: [0, 1]}")
    s.add_argument("--out", required=True, help="sweep directory: runs/, results.jsonl, table.md, *.png")
    s.add_argument("--slurm", action="store_true", help="submit each run with slurm/train.sbatch and wait")
    s.add_argument("--nproc", type=int, default=2, help="ranks per run under torchrun (default 2)")
    s.add_argument("--budget-flops", type=float, default=None, metavar="F",
                   help="train every run to F training FLOPs (every method's forwards charged) instead of its "
                        "max_steps; each run's schedule is scaled to its step count")
    s.add_argument("--no-throughput", action="store_true",
                   help="skip the controlled step-throughput measurement (bench train over every variant, once "
                        "every run has finished; reused while the variants and config are unchanged)")
    s.add_argument("--throughput-steps", type=int, default=20, metavar="N", help="timed steps per variant and round")
    s.add_argument("--throughput-warmup", type=int, default=5, metavar="N", help="untimed steps before them")
    s.add_argument("--throughput-rounds", type=int, default=3, metavar="R",
                   help="rounds, alternating the variants' order (each variant's median round is kept)")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    c = sub.add_parser("select", help="ensemble confident learning: score pairs with checkpoints, keep the best (EfficientCLIP)")
    c.add_argument("--checkpoints", nargs="+", required=True, help="the ensemble: checkpoints or run directories of one model shape")
    c.add_argument("--shards", required=True, nargs="+", help="shards to score: directories, brace patterns, or files")
    c.add_argument("--out", required=True, help="writes scores.jsonl, manifest.txt, index.json, summary.json (and parts/)")
    rule = c.add_mutually_exclusive_group()
    rule.add_argument("--keep", type=float, help="keep this top fraction of the current subset by score (default 0.9)")
    rule.add_argument("--threshold", type=float, help="keep samples whose score (the sum of the members' scores) is >= this")
    rule.add_argument("--percentile", type=float, help="keep samples scoring >= this percentile (0-100) of the subset")
    c.add_argument("--manifest", help="the current subset (an earlier selection, or a key-per-line file): only its samples are scored")
    c.add_argument("--scores-from", nargs="+", help="earlier selections whose scores are added (the temporal ensemble)")
    c.add_argument("--score", choices=("selfconf", "cosine"), default="selfconf",
                   help="each member's score: selfconf (the pair's log-softmax against a candidate pool, both directions; default) or cosine (the public code's)")
    c.add_argument("--temperature", default="100", help="selfconf: logits = TEMPERATURE x cosine; 'scale': each member's own logit scale (default 100)")
    c.add_argument("--pool", type=int, default=1024, help="selfconf: the candidates, the first N pairs (of --manifest's subset) in shard order (default 1024)")
    c.add_argument("--batch-size", type=int, default=256, help="scoring batch per rank (default 256)")
    c.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    c.add_argument("--merge-only", action="store_true", help="only merge the scored parts (e.g. a job after an array)")
    v = sub.add_parser("convert-manifest", help="a key-per-line data.manifest as the per-shard form (manifest.txt + "
                                                "index.json) that each loader worker reads one shard at a time")
    v.add_argument("--manifest", required=True, help="the key-per-line file (# comments allowed)")
    v.add_argument("--shards", required=True, nargs="+", help="the training shards (as data.train_shards): directories, "
                                                              "brace patterns, files or pipe: URLs")
    v.add_argument("--out", required=True, help="writes manifest.txt and index.json; then data.manifest=OUT")
    g = sub.add_parser("grow", help="GrowCLIP checkpoint surgery: a grown model from a checkpoint, for checkpoint.init")
    g.add_argument("--checkpoint", required=True, help="checkpoint (step_N, checkpoints/ or run directory) of any ZeRO stage")
    g.add_argument("--out", required=True, help="writes weights.pt, config.yaml (the grown shape), grow.json")
    g.add_argument("--pim-beta", type=float, default=0.9, help="parameter inheriting with momentum: beta * grown + (1 - beta) * fresh init; 1 = exact inheritance (default 0.9)")
    g.add_argument("--split", choices=("equal", "random"), default="equal", help="width growth: input columns split into equal pieces, or pieces with zero-sum noise (symmetry breaking, still exact)")
    g.add_argument("--split-noise", type=float, default=0.1, help="--split random: noise std relative to each tensor's std (default 0.1)")
    g.add_argument("--optimizer", choices=("reset", "transform"), default="reset", help="the next stage's AdamW: fresh (reset), or the source's moments and step mapped like the weights (transform; exact for --split equal --pim-beta 1); the learning-rate schedule restarts either way")
    g.add_argument("--search", nargs="?", const=True, default=None, metavar="CANDIDATES.yaml",
                   help="growth search: grow each candidate ({name: {model.key: value}}; default: deeper towers, "
                        "shared layers, width x2), train each briefly at equal FLOPs, rank by validation loss")
    g.add_argument("--search-steps", type=int, default=50, help="--search: training steps per candidate (default 50)")
    g.add_argument("--nproc", type=int, default=2, help="--search: ranks per candidate run under torchrun (default 2)")
    g.add_argument("--slurm", action="store_true", help="--search: submit each candidate's training as a SLURM job")
    g.add_argument("overrides", nargs="*", help="model.key=value: the grown shape (e.g. model.vision_layers=8); "
                                                "with --search: training overrides for the candidates (e.g. the newest data.train_shards)")
    b = sub.add_parser("bench", help="benchmarks: bench " + "|".join(BENCHMARKS) + " [options] (bench NAME --help)",
                       description="Benchmarks; each writes its rows, a table and a plot under --out:\n"
                       + "\n".join(f"  {k:9s} {v}" for k, v in BENCHMARKS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("what", metavar="NAME", help="|".join(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.verb == "train" and args.help_config:
        print("\n".join(describe()))
        return 0
    if args.verb == "train" and not args.config:
        print("error: train needs --config FILE (e.g. trainer/configs/demo.yaml)", file=sys.stderr)
        return 2
    handlers = {"train": _train, "make-demo-data": _make_demo_data, "make-tokenizer": _make_tokenizer, "eval": _eval, "export-hf": _export, "export-open-clip": _export_open_clip,
                "bench": _bench, "sweep": _sweep, "select": _select, "grow": _grow,
                "convert-manifest": _convert_manifest}
    try:
        return handlers[args.verb](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
