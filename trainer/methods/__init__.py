"""The methods beyond plain CLIP, one module each, each a config switch (../shared/METHODS.md).

- ``eclipse``: ECLIPSE's momentum image teacher (EMA under every ZeRO stage) and its KL term
- ``evit``: EViT token dropping / FLIP patch dropout inside the ``transformers`` vision tower

``trainer/train.py`` only calls what these expose: a teacher object the step updates, named loss
terms, and runtime switches on the model.
"""
