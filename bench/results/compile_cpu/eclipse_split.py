"""    PYTHONPATH=. .venv/bin/python bench/results/compile_cpu/eclipse_split.py eager|compiled PRESET BATCH REPS KEEP
ECLIPSE's split, in one process, CPU time per call (robust to a loaded machine):
teacher forward (no_grad), student forward+backward at the keep rate, plain CLIP forward+backward."""
import sys, time, torch
torch.set_num_threads(1)
from trainer.config import load_config
from trainer import data as D
from trainer.model import build_model, preset_shape, compile_layers
from trainer.methods import attach
from trainer.methods.evit import set_keep_rate
mode, preset, B, reps, keep = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ov = [f"model.preset={preset}"] + (["model.context_length=77"] if preset != "tiny" else [])
cfg = load_config("trainer/configs/eclipse.yaml", ov)
tok = D.load_tokenizer(cfg.tokenizer.path)
plain = build_model(cfg.model, tok, 0)
ecl = build_model(cfg.model, tok, 0); attach(ecl, cfg)
if mode == "compiled":
    compile_layers(plain); compile_layers(ecl)
s = preset_shape(cfg.model)
x = torch.randn(B, 3, s["image_size"], s["image_size"]); ids = torch.randint(1, 100, (B, s["context_length"]))
ids[:, -1] = tok.eos_token_id; mask = torch.ones_like(ids)
def loss_of(i, t, sc):
    lg = sc * i @ t.T; lab = torch.arange(B)
    return (torch.nn.functional.cross_entropy(lg, lab) + torch.nn.functional.cross_entropy(lg.T, lab)) / 2
def plain_step():
    loss_of(*plain(pixel_values=x, input_ids=ids, attention_mask=mask)).backward()
def teacher_fwd():
    with torch.no_grad():
        ecl.teacher(x)
def teacher_fwd_inference():
    with torch.inference_mode():
        ecl.teacher(x)
def student_step():
    loss_of(*ecl(pixel_values=x, input_ids=ids, attention_mask=mask)).backward()
set_keep_rate(ecl.vision_model, keep)
fns = {"plain fwd+bwd": plain_step, "student fwd+bwd": student_step, "teacher fwd (no_grad)": teacher_fwd,
       "teacher fwd (inference_mode)": teacher_fwd_inference}
t0 = time.time()
for f in fns.values():
    for _ in range(2): f()
warm = time.time() - t0
res = {k: [] for k in fns}
for r in range(reps):
    for k, f in fns.items():
        t = time.process_time(); f(); res[k].append(time.process_time() - t)
med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in res.items()}
print(f"{mode} {preset} batch {B} keep {keep}: warm-up (compile) {warm:.0f} s wall")
for k, v in med.items():
    print(f"  {k:30s} {v:8.1f} CPU ms (median of {reps})")
ratio = (med["student fwd+bwd"] + med["teacher fwd (no_grad)"]) / med["plain fwd+bwd"]
print(f"  (student + teacher) / plain = {ratio:.3f}")
