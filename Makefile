# rigsa: the index of entry points. `make help` lists them.
# Variables: MODEL (hub id or local directory), ITERS (IMP iterations), TASK (eval task),
#            ADAPTER (RUN/iterK to evaluate), OUT (run directory), PAPER (reproduce.py's directory),
#            NPROC (processes per machine for torchrun; 1 = no torchrun), ARGS (more flags for demo, train, eval,
#            paper and chat, as their --help gives them: ARGS='--no-verify --resume'). Values are quoted: spaces and quotes stay.
PY       := .venv/bin/python
BENCH_PY := .venv-bench/bin/python
MODEL    ?= HuggingFaceTB/SmolLM2-1.7B-Instruct
ITERS    ?= 5
TASK     ?= all
ADAPTER  ?=
OUT      ?= runs/rigsa
PAPER    ?= runs/paper
NPROC    ?= 1
ARGS     ?=
# a value for the shell, single-quoted, a ' in it written '\'' (a space or a quote stays in its value)
override q = '$(subst ','\'',$(1))'
# torchrun for NPROC > 1; a NPROC that is no count is said in one line by the targets that use it
RUN       = $(if $(shell echo $(call q,$(NPROC)) | grep -Ex '[1-9][0-9]*'),,$(error NPROC=$(NPROC): the processes per machine, \
            a whole number from 1 (1: no torchrun)))$(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run \
            --standalone --nproc-per-node=$(NPROC))

.PHONY: help test demo docs train eval paper plots chat bench bench-model bench-train bench-memory bench-layer bench-distributed device-check \
        bench-precision bench-checkpoint bench-evals-bf16 \
        bench-evals bench-generate bench-attention bench-qlora check-lm-eval parity-gsm8k

help:            ## this list
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed 's/:.*## /\t/'

# the environment: .venv with the pinned runtime and test requirements (re-made when they change); the
# bytecode compiled on every core (pip's own pass uses one: a minute of the two on a 2-core machine), and as
# pip does, a file this Python cannot compile is left (torch ships one written for Python 3.12)
.venv/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --no-compile -r requirements.txt -r requirements-dev.txt
	$(PY) -m compileall -q -j 0 .venv/lib >/dev/null || true
	touch $@

# the benchmark-only peers (lm-evaluation-harness) in an environment of their own: the tests' stays without them
.venv-bench/.installed: requirements.txt requirements-dev.txt requirements-bench.txt
	test -x $(BENCH_PY) || python3 -m venv .venv-bench
	$(BENCH_PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BENCH_PY) -m pip install -q -r requirements.txt -r requirements-bench.txt
	touch $@

# matplotlib for the figures, outside .venv (the runtime needs it not; the tests put it on PYTHONPATH to
# check the figures, and hide it to check the run without it); .venv's own numpy is the one used
.plots/.installed: requirements-plots.txt | .venv/.installed
	$(PY) -m pip install -q --no-compile --target .plots -r requirements-plots.txt
	rm -rf .plots/numpy .plots/numpy-* .plots/numpy.libs
	$(PY) -m compileall -q -j 0 .plots >/dev/null || true
	touch $@

test: .venv/.installed .plots/.installed   ## create the environment if needed, run every test (CPU, offline; 2 workers)
	PYTHONPATH=.plots $(PY) -m pytest -q -n 2

# demo: OUT only where given (the default OUT is train's); chat: an ADAPTER is said, not dropped
demo: .venv/.installed          ## the whole RIGSA pipeline on a tiny model, offline, into runs/demo (or OUT), under a minute on a CPU
	$(PY) rigsa.py demo $(if $(filter-out file,$(origin OUT)),--out $(call q,$(OUT))) $(ARGS)

docs: .venv/.installed          ## docs/cli.md from every command's --help (a test keeps them equal)
	$(PY) docs/make_cli.py

train: .venv/.installed         ## the paper's run: RIGSA, ITERS IMP iterations on MODEL, into OUT (NPROC processes)
	$(RUN) rigsa.py train --model $(call q,$(MODEL)) --iters $(call q,$(ITERS)) --out $(call q,$(OUT)) $(ARGS)

eval: .venv/.installed          ## evaluate MODEL, or ADAPTER on its own base (on MODEL if given), on TASK, lm-eval's protocol (NPROC processes)
	$(RUN) evals/run.py --task $(call q,$(TASK)) $(if $(and $(ADAPTER),$(filter file,$(origin MODEL))),,--model $(call q,$(MODEL))) \
	    $(if $(ADAPTER),--adapter $(call q,$(ADAPTER))) $(ARGS)

paper: .venv/.installed         ## from a fresh clone to the paper's tables and figures (PAPER/TABLES.md; days on one GPU)
	PYTHONPATH=$(if $(wildcard .plots/.installed),.plots,) $(PY) reproduce.py --model $(call q,$(MODEL)) --out $(call q,$(PAPER)) --nproc $(call q,$(NPROC)) $(ARGS)

plots: .venv/.installed .plots/.installed  ## TABLES.md and Figures 2-4 (PNG) from what PAPER holds
	PYTHONPATH=.plots $(PY) reproduce.py --tables-only --out $(call q,$(PAPER))

chat: .venv/.installed          ## one chat message to MODEL (the paper's Figure 6)
	$(if $(ADAPTER),$(error ADAPTER=$(ADAPTER): make chat talks to MODEL alone; merge the adapter first \
	    (rigsa.py merge --adapter $(ADAPTER) --out DIR), then make chat MODEL=DIR))
	$(PY) model.py --model $(call q,$(MODEL)) --prompt "What is the capital of France?" $(ARGS)

bench: bench-model bench-train bench-memory bench-layer bench-distributed bench-evals bench-generate bench-attention bench-qlora bench-precision bench-checkpoint bench-evals-bf16  ## every benchmark, side by side with the peers (not parity-gsm8k: a 35-minute training first; check-lm-eval and device-check are checks, not timings)

bench-model: .venv/.installed   ## prefill and batched decode against transformers (135M shape, CPU)
	$(PY) bench/bench_model.py

bench-train: .venv/.installed   ## RIGSA step vs full fine-tuning vs transformers (135M shape, CPU)
	$(PY) bench/bench_train.py

bench-memory: .venv/.installed  ## training memory and step time, compact layer vs the dense one (135M, CPU), and the 1.7B projection
	$(PY) bench/bench_memory.py

bench-layer: .venv/.installed   ## one gated projection: compact vs dense forward+backward, GEMMs vs the rest, the index kernels tried
	$(PY) bench/bench_layer.py

bench-distributed: .venv/.installed  ## 2 gloo processes against 1 (CPU): training and evaluation speed-up, all-reduce share
	$(PY) bench/bench_distributed.py

bench-precision: .venv/.installed  ## the bfloat16 training step (--dtype auto on such CPUs) against float32's, 135M shape, CPU
	$(PY) bench/bench_precision.py
	$(PY) bench/bench_precision.py --part attention,profile
	$(PY) bench/bench_precision.py --part loop --loop-steps 2

bench-checkpoint: .venv/.installed  ## --checkpoint-activations: saved bytes and step time (135M shape), the 1.7B projection per card
	$(PY) bench/bench_checkpoint.py

bench-evals-bf16: .venv-bench/.installed  ## evals/ in bfloat16 against its float32 run and lm-eval's bfloat16 batch-16 run (needs data/)
	$(BENCH_PY) bench/bench_evals.py --data-dir data --dtype bfloat16 --also-float32 --lm-eval-batch-size 16 --tasks piqa,gsm8k \
	    --limit-piqa 200 --limit-gsm8k 16 --limit-gsm8k-lm-eval 16 --repeats 1

bench-evals: .venv-bench/.installed  ## evals/ against lm-eval's HF backend (needs data/ files)
	$(BENCH_PY) bench/bench_evals.py --data-dir data --limit-gsm8k 128 --limit-gsm8k-lm-eval 8

check-lm-eval: .venv-bench/.installed  ## our --output_path/--log_samples files read by lm-eval 0.4.13 (make_table, hashes, metrics)
	$(BENCH_PY) bench/check_lm_eval.py

bench-generate: .venv/.installed  ## GSM8k-shaped generation alone, rows stopping at different steps (needs data/gsm8k)
	$(PY) bench/bench_generate.py --data-dir data --docs 64 --stop-after 60,200

bench-attention: .venv/.installed  ## a GSM8k decode step's split, and its attention's read rate against a plain read (CPU), float32 then bfloat16
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_attention.py --dtype bfloat16

# a small model trained on GSM8k's training set (~35 min on 2 CPU cores), whose generations are text;
# 1500 steps rather than the script's 400: half of its generations end in "#### N" and 10% stop early
runs/text-model/model.safetensors: bench/train_text_model.py | .venv/.installed
	$(PY) bench/train_text_model.py --data-dir data --out runs/text-model --steps 1500

parity-gsm8k: .venv-bench/.installed runs/text-model/model.safetensors  ## GSM8k generations vs lm-eval's on all 1,319 documents, on a trained model (needs data/gsm8k)
	$(BENCH_PY) bench/bench_evals.py --data-dir data --model runs/text-model --tasks gsm8k --limit-gsm8k 0 --limit-gsm8k-lm-eval 0

bench-qlora: .venv/.installed   ## NF4 bytes per parameter, QLoRA step and forward (135M shape, CPU)
	$(PY) bench/bench_qlora.py

device-check: .venv/.installed  ## the GPU window's script (bench/device.sh) at a small shape on the CPU, as it must pass before a device runs it (needs data/)
	SMALL=1 bash bench/device.sh
