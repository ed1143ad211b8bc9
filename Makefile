# Two commands a newcomer needs: `make demo` and `make test` (see README.md).
PY ?= .venv/bin/python
PIP = .venv/bin/pip
DEMO_DIR ?= runs/demo-data
DEMO_OUT ?= runs/demo
NPROC ?= 2

.PHONY: demo test test-all venv clean

venv: .venv/.installed

# torch first: deepspeed is a source package whose build imports it. DeepSpeed's CPU
# shared-memory all-reduce op is compiled at install time (DS_BUILD_SHM_COMM=1): left to its JIT,
# every process whose environment differs (PATH, srun) recompiles it for ~2 minutes at start-up.
# --no-cache-dir so pip cannot reuse a cached deepspeed wheel built without the op.
.venv/.installed: requirements.txt
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $$(grep -E '^(torch|torchvision)==' requirements.txt)
	grep -v '^deepspeed==' requirements.txt > .venv/requirements-nods.txt
	$(PIP) install -q --no-build-isolation -r .venv/requirements-nods.txt
	DS_BUILD_SHM_COMM=1 $(PIP) install -q --no-build-isolation --no-cache-dir $$(grep -E '^deepspeed==' requirements.txt)
	$(PY) -c "import deepspeed.git_version_info as g; assert g.installed_ops.get('deepspeed_shm_comm'), 'deepspeed shm op not precompiled'"
	touch $@

demo: venv
	bash scripts/demo.sh $(DEMO_DIR) $(DEMO_OUT) $(NPROC)

# The fast tier (CI: .ci/run): every feature end to end at least once; tests marked `full`
# (pytest.ini) are left to `make test-all`. -rs prints why anything skipped. Measured 2026-12-07 on a
# clean clone by .ci/run (a fresh venv, CI's environment, real SLURM daemons), 2 idle cores:
# 431 tests in 14 min 37 s, about 16 min 50 s with the install (commit c8323c3; the fp16 overflow
# test has halved since).
test: venv
	$(PY) -m pytest -q -rs -m "not full" --durations=15 tests

# Everything: the fast tier and the `full` tests (ZeRO 0/2 variants, compile matrix, benchmarks, ...).
# Measured 2026-12-06 on a clean clone of the tiers' branch (commit bb18e00: 450 of the then 468 tests):
# 44 min 50 s on 2 cores while another full test run shared the machine (load 5-6), so an upper bound;
# today's 499 tests (68 full) were not timed together.
test-all: venv
	$(PY) -m pytest -q -rs --durations=25 tests

clean:
	rm -rf runs
