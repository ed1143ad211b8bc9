"""A stop signal reaches long work outside the training step at its next forward (in process,
no process group: the agreement's all-reduce is then the identity). The 2-rank runs that stop
in an evaluation and in an ECL round are in test_train_e2e.py and test_selection.py (full tier)."""
import pytest
import torch

from trainer.evaluate import embed_split
from trainer.faults import StopRequested


class _Model(torch.nn.Module):
    config = type("C", (), {"projection_dim": 3})()

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def forward(self, pixel_values, input_ids, attention_mask):
        self.forwards += 1
        b = pixel_values.shape[0]
        return torch.ones(b, 3), torch.ones(b, 3), torch.tensor(1.0)


def _batch():
    return {"image": torch.zeros(2, 3, 4, 4), "input_ids": torch.zeros(2, 5, dtype=torch.long),
            "attention_mask": torch.ones(2, 5, dtype=torch.long), "label": torch.zeros(2, dtype=torch.long)}


def test_evaluation_stops_at_the_forward_after_the_signal():
    model, polls = _Model(), []

    def should_stop():
        polls.append(model.forwards)
        return model.forwards >= 2          # the signal arrives during the second forward
    with pytest.raises(StopRequested):
        embed_split(model, [_batch() for _ in range(5)], _batch(), "cpu", torch.float32, should_stop)
    assert model.forwards == 2 and polls == [0, 1, 2]
    img, _, labels, _ = embed_split(_Model(), [_batch() for _ in range(5)], _batch(), "cpu", torch.float32)
    assert img.shape == (10, 3) and labels.shape == (10,)
