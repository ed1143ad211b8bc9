"""Single process, one thread, b = 64, d = 64 (tiny): CPU time of the CLIP loss and of ECLIPSE's
distillation loss (forward + backward). Measured 2026-12-07 07:10 UTC: clip 0.41 ms, distill 0.61 ms.
    PYTHONPATH=. .venv/bin/python bench/results/compile_cpu/loss_cost.py
"""
import time, torch
torch.set_num_threads(1)
import kernels
b, d = 64, 64
torch.manual_seed(0)
def mk():
    i = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    return i, t
teacher = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
scale = torch.tensor(14.3, requires_grad=True)
def clip():
    i, t = mk(); kernels.gathered_clip_loss(i, t, scale).backward()
def distill():
    i, t = mk(); out = kernels.gathered_distill_loss(i, t, scale, teacher_image_emb=teacher)
    (out.loss if hasattr(out, "loss") else out[0]).backward()
for f in (clip, distill):
    for _ in range(3): f()
    ts = []
    for _ in range(30):
        t0 = time.process_time(); f(); ts.append(time.process_time() - t0)
    print(f.__name__, "median CPU ms", round(1000 * sorted(ts)[15], 2))
