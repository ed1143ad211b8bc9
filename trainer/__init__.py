"""CLIP pre-training at a fraction of the usual compute: DeepSpeed ZeRO, fused losses, teachers,
data selection and model growth. Entry point: ``python -m trainer VERB ...`` (see cli.py)."""
