# Two commands do all the set-up on a fresh machine with Python 3 and git:
#   make demo   # creates .venv, installs the run-time packages, completes text with the bundled demo model
#   make test   # creates .venv, installs the test packages, runs the test suite (what CI runs)
# and, while working: make test-fast   # the suite without the tests marked slow (docs/testing.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned for the set-up (a CPU build on machines without CUDA wheels); requirements.txt keeps a range.
TORCH := torch==2.13.0

.PHONY: demo test test-fast venv clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) example_text_completion.py

test: venv
	$(PY) -m pytest -q tests

# One OpenMP thread unless OMP_NUM_THREADS is set: as fast for the tiny test models on an idle machine, and
# several times faster on a busy one, where threads spin waiting for a descheduled sibling.
test-fast: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV)
