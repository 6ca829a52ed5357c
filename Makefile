# rigsa: the index of entry points. Variables: MODEL (hub id or directory), ITERS, TASK.
PY     := .venv/bin/python
MODEL  ?= HuggingFaceTB/SmolLM2-1.7B-Instruct
ITERS  ?= 5
TASK   ?= all

.PHONY: test bench demo train eval chat

# the environment: .venv with the pinned runtime and test requirements (re-made when they change)
.venv/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# make test: create the environment if needed, then run every test (CPU, offline, about a minute)
test: .venv/.installed
	$(PY) -m pytest -q

# make bench: speed against the peers, measured side by side in one run (see BENCHMARKS.md)
bench: .venv/.installed
	$(PY) bench/bench_model.py

# make chat: one chat message to the model (the paper's Figure 6 experience)
chat: .venv/.installed
	$(PY) model.py --model $(MODEL) --prompt "What is the capital of France?"
