"""The zero-shot classifier's prompts are tokenized once per run (trainer.evaluate.prompt_tokens),
and its text embeddings are computed at every evaluation: the text tower trains between them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def test_classifier_tokenizes_once_and_follows_the_text_towers_weights(demo_data):
    from trainer.data import SampleDecoder, load_tokenizer
    from trainer.evaluate import prompt_tokens, zeroshot_classifier

    tokenizer = load_tokenizer(str(demo_data / "tokenizer"))
    decoder = SampleDecoder(tokenizer, 16, None)

    class TextTower(torch.nn.Module):   # the masked mean of a learned token embedding, normalised
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(tokenizer), 8)

        def encode_text(self, input_ids, attention_mask):
            return F.normalize((self.emb(input_ids) * attention_mask[..., None]).sum(1), dim=-1)

    torch.manual_seed(0)
    model = TextTower()
    names, templates = ["red circle", "blue square", "green triangle"], ["a {}.", "a photo of a {}."]

    @torch.no_grad()
    def reference():   # tokenized afresh, one class at a time, plain torch
        rows = []
        for name in names:
            tok = decoder.tokenize([t.format(name) for t in templates])
            rows.append(F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"]).mean(0), dim=-1))
        return torch.stack(rows)

    prompt_tokens.cache_clear()
    first = zeroshot_classifier(model, decoder, names, templates, "cpu")
    torch.testing.assert_close(first, reference(), rtol=0, atol=1e-6)
    with torch.no_grad():
        model.emb.weight.mul_(-0.5).add_(torch.randn_like(model.emb.weight))   # a training step's worth of change
    second = zeroshot_classifier(model, decoder, names, templates, "cpu")
    torch.testing.assert_close(second, reference(), rtol=0, atol=1e-6)
    assert (second - first).abs().max() > 0.1                                # recomputed, not cached
    info = prompt_tokens.cache_info()
    assert (info.misses, info.hits) == (1, 1)                                # tokenized once
    zeroshot_classifier(model, decoder, names, ["an {}."], "cpu")            # other prompts: tokenized anew
    assert prompt_tokens.cache_info().misses == 2
