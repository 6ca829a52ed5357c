"""
lib/: the machinery that serves rigsa.py, one job per module, every arrow pointing here from above
(rigsa.py, cli.py, qlora.py, model.py, evals/, reproduce.py import these; none of these imports them,
except that the modules that need the base model or the 4-bit layers import model.py and qlora.py).

  sparse          dW held at its free entries only, and the gated layer's product from that storage
  memory          where AdamW's moments live (device, host, 8-bit), the memory estimate and its choice
  rundir          a run directory's life: resume, signals, provenance, locking, the metrics log
  adapter_files   the adapter file format (the packed mask), the base-identity check, merging
  flags           a config dataclass as command-line flags: help, range, needs, refusal, resume
  mnist           MNIST's IDX files: download, checks, a run's splits, the synthetic digits
  tiny            stand-ins for the demo, tests and benches: a SmolLM2-shaped tokenizer, random checkpoints
  interrupts      Ctrl-C and SIGTERM: one line and the command that continues (standard library only)
  util            the chores, once each: atomic writes, downloads, the progress bar, the device, torchrun
Nothing here runs on import (interrupts must load before torch).
"""
