"""One process, one thread: the CLIP step (forward, loss, backward; no optimizer) of our model,
CPU time per step (time.process_time: robust to a loaded machine). MODE: eager | layers (each
transformer layer compiled, what model.compile does) | towers (each tower compiled whole).
    PYTHONPATH=. .venv/bin/python bench/results/compile_cpu/micro_step.py MODE PRESET BATCH STEPS
"""
import sys, time, torch
torch.set_num_threads(1)
from trainer.config import load_config
from trainer import data as D
from trainer.model import build_model
mode = sys.argv[1]; preset = sys.argv[2]; B = int(sys.argv[3])
cfg = load_config("trainer/configs/demo.yaml", [f"model.preset={preset}"] + (["model.context_length=77"] if preset!="tiny" else []))
tok = D.load_tokenizer(cfg.tokenizer.path)
m = build_model(cfg.model, tok, 0)
from trainer.model import preset_shape
s = preset_shape(cfg.model)
x = torch.randn(B, 3, s["image_size"], s["image_size"]); ids = torch.randint(1, 100, (B, s["context_length"])); ids[:, -1] = tok.eos_token_id
mask = torch.ones_like(ids)
if mode == "layers":
    for tower in (m.vision_model, m.text_model):
        for l in tower.encoder.layers: l.compile()
elif mode == "towers":
    m.vision_model.compile(); m.text_model.compile()
def step():
    i, t, sc = m(pixel_values=x, input_ids=ids, attention_mask=mask)
    logits = sc * i @ t.T
    lab = torch.arange(B)
    loss = (torch.nn.functional.cross_entropy(logits, lab) + torch.nn.functional.cross_entropy(logits.T, lab)) / 2
    loss.backward()
    return loss
t0 = time.time(); l0 = step(); print(mode, "first step s", round(time.time() - t0, 1), "loss", l0.item())
for _ in range(2): step()
ts = []
for _ in range(int(sys.argv[4])):
    t = time.process_time(); step(); ts.append(time.process_time() - t)
ts.sort(); print(mode, preset, "median step CPU ms", round(1000 * ts[len(ts)//2], 1), "min", round(1000*ts[0],1))
