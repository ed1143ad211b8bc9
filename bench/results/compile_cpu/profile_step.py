"""torch.profiler table of 3 steps of micro_step.py (MODE PRESET BATCH 0): where the CPU time goes.
    PYTHONPATH=. .venv/bin/python bench/results/compile_cpu/profile_step.py eager tiny 64 0
"""
exec(open(__file__.replace("profile_step", "micro_step")).read().split("t0 = time.time()")[0])
for _ in range(3): step()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
