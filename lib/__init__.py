"""
lib/: the machinery that serves rigsa.py, one job per module. With model.py and qlora.py it forms the
layer below the method: none of them imports rigsa.py, cli.py, reproduce.py or evals/ (tests/test_house.py);
within the layer, model.py uses util and interrupts; qlora.py uses model.py and util; the modules that need
the base model or the 4-bit layers use model.py and qlora.py.

  sparse          the arithmetic of dW held at its free entries (positions, m * dW, W0 + alpha m dW) and
                  the gated layer's product from that storage (GatedDelta)
  memory          where AdamW's moments live (device, host, 8-bit), the memory estimate and its choice
  rundir          a run directory's life: resume, when to save and stop, signals, provenance, locking
  adapter_files   the adapter file format (the packed mask), the base-identity check, merging
  flags           a config dataclass as command-line flags: help, range, needs, refusal, resume
  mnist           MNIST's IDX files: download, checks, a run's splits, the synthetic digits
  tiny            stand-ins for the demo, tests and benches: a SmolLM2-shaped tokenizer, random checkpoints
  interrupts      Ctrl-C and SIGTERM: one line and the command that continues (standard library only)
  util            the chores, once each: atomic writes, downloads, the progress bar, the device, torchrun
Nothing here runs on import (interrupts must load before torch).
"""
