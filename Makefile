# Two commands a newcomer needs: `make demo` and `make test` (see README.md).
PY ?= .venv/bin/python
PIP = .venv/bin/pip
DEMO_DIR ?= runs/demo-data
DEMO_OUT ?= runs/demo
NPROC ?= 2

.PHONY: demo test venv clean

venv: .venv/.installed

# torch first: deepspeed is a source package whose build imports it.
.venv/.installed: requirements.txt
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $$(grep -E '^(torch|torchvision)==' requirements.txt)
	$(PIP) install -q --no-build-isolation -r requirements.txt
	touch $@

demo: venv
	bash scripts/demo.sh $(DEMO_DIR) $(DEMO_OUT) $(NPROC)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf runs
