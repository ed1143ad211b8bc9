"""W gloo ranks on CPU give the same loss and gradients as one process holding the whole batch.

For every impl (torch reference, chunked, Triton under the interpreter) and for the plain and
the distillation losses (self-distillation from the same pass or from teacher embeddings): mean over ranks of the loss (and of each term) equals the full-batch
value; each rank's gradient of its own rows' features, divided by W, equals the full-batch
gradient of those rows (the text gradients reach their owner through the gather's backward);
the sum over ranks of the shared projection's and the logit scale's gradients, divided by W
(what DeepSpeed's averaging does), equals the full-batch gradient. The text-to-image direction
is exact only if the column statistics are combined across ranks.
"""
import pytest
import torch

from kernels.testing import make_batch, rel_err, run_case, spawn_ranks

IMPLS = ("torch", "chunked", "triton")
# distill_psd_teacher: the self-distillation teacher's own texts are gathered too, and its
# column statistics combined across ranks; psd_teacher_shared: the student's texts;
# distill_psd_ecl: the momentum teacher's T reused
KINDS = ("clip", "distill", "distill_psd_teacher", "psd_teacher_shared", "distill_psd_ecl")
CASES = [(f"{impl}/{kind}", {"impl": impl, "kind": kind, "grad_output": 1.5})
         for impl in IMPLS for kind in KINDS]


@pytest.mark.parametrize("sizes", [[8, 8], [6, 3, 5]], ids=["2-ranks", "3-ranks-ragged"])
def test_ranks_match_one_process(sizes):
    world, n = len(sizes), sum(sizes)
    batch = make_batch(n, 12, seed=5, scale=20.0)
    ranks = spawn_ranks(sizes, batch, CASES, interpret=True)
    failures = []
    for name, case in CASES:
        full = run_case(batch, slice(0, n), "torch", case["kind"], grad_output=1.5)
        got = {
            "loss": torch.stack([r[name]["loss"] for r in ranks]).mean(),
            "terms": torch.stack([r[name]["terms"] for r in ranks]).mean(0),
            "proj": sum(r[name]["proj"] for r in ranks) / world,
            "scale": sum(r[name]["scale"] for r in ranks) / world,
            "fx": torch.cat([r[name]["fx"] for r in ranks]) / world,
            "fy": torch.cat([r[name]["fy"] for r in ranks]) / world,
        }
        for key, value in got.items():
            err = rel_err(value, full[key], floor=1e-2)
            if not err < 1e-5:
                failures.append(f"{name} {key}: relative error {err:.2e}")
    assert not failures, failures

