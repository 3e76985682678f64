"""The plumbing every run needs and no researcher forks, so that the method files read like the method.

It imports none of them. A file per job:
  config.py       YAML + --set -> a checked dataclass tree; the --help-config table
  seeds.py        every random stream's seed; the global RNGs' state
  models.py       hub id / folder / GGUF / alias -> a peft model with LoRA, its tokenizer, the device
  dist.py         torchrun: Dist and its collectives, joining the process group, fingerprints
  guards.py       update guards (TrainingError), Ctrl-C and out-of-memory handling
  checkpoints.py  save, find, load and restore checkpoints, without running their code
  runlog.py       the run folder, metrics.jsonl and samples.jsonl, the summary, timers, progress
  trackers.py     live curves: TensorBoard, W&B, trackio
  plan.py         the memory plan (fst.py --plan)
  startup.py      the command line and the start-up checks
"""
