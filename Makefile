# `make demo` and `make test` work on a fresh clone: they create .venv/ when missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bench clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first: here `torch==2.13.0` is a local CPU build; anything else may pull CUDA wheels.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/skillpipe demo --out cache/demo

test: $(STAMP)
	# -n auto: one worker per core (pytest-xdist); most tests wait on child processes, timeouts or compilers
	$(PY) -m pytest -q -n auto tests

bench: $(STAMP)
	$(PY) -m bench
