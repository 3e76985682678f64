"""Start-up: fst.py's command line, and every check that can fail before a run folder exists (config, tasks,
data paths, checkpoints, device, the memory plan on a CUDA card, trackers), each stopping with one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from plumbing import checkpoints, config, models, plan, trackers


def check_paths_and_tasks(cfg, make_task) -> None:
    """What load_config cannot see in the keys alone: each task (and schedule stage) can be built from its
    section and its data files exist; init_from holds a checkpoint. ConfigError (SystemExit for init_from)."""
    for key, tc in [("task", cfg.task)] + [(f"schedule[{i}]", s) for i, s in enumerate(cfg.schedule)]:
        for name in ("train_path", "test_path"):
            path = getattr(tc, name)
            if path is not None and not Path(path).is_file():
                raise config.ConfigError(f"config key '{key}.{name}': file not found: {path}")
        try:
            make_task(tc)
        except Exception as e:  # whatever a task's constructor raises about its options
            where = getattr(e, "key", None)  # rewards.TaskConfigError knows which key it refuses
            raise config.ConfigError(f"config key '{key}.{where}': {e}" if where else
                                     f"config key '{key}.options': task {tc.name!r} refused them: {e}") from None
    if cfg.init_from:
        checkpoints.find_checkpoint(cfg.init_from, what="init_from: ")


def command_line(argv=None, description: str = ""):
    """fst.py's arguments: a new run (--config, --set), a resumed one (--resume), or --help-config / --plan."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (a name like gsm8k.yaml also finds configs/gsm8k.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=20 (repeatable)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    ap.add_argument("--help-config", action="store_true",
                    help="print every config key with its default and meaning (the README's table) and exit")
    ap.add_argument("--plan", action="store_true", help="print the memory plan (peak GPU memory of each phase) and exit")
    ap.add_argument("--gpu-gib", type=float, metavar="N", help="--plan for a card of N GiB (default: this one's, or 24)")
    args = ap.parse_args(argv)
    if not args.help_config and not args.config and not args.resume:
        ap.error("give --config (a new run) or --resume RUN_DIR")
    return args


def answered_without_a_run(args, config_cls, load_config) -> bool:
    """--help-config (the config table) and --plan (the memory plan): printed, and no run starts."""
    try:
        if args.help_config:
            print(config.config_table(config_cls))
        elif args.plan:
            plan.print_memory_plan(args, load_config)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` stopped reading: quietly, and no second error when Python exits
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return bool(args.help_config or args.plan)


def start_up(args, dist, load_config, make_task):
    """fst.main's arguments -> (config, run folder, config file name) of a new or resumed run, checked."""
    try:
        if args.resume:
            run_dir, config_name = Path(args.resume), str(Path(args.resume) / "config.yaml")
            if not Path(config_name).is_file():
                raise SystemExit(f"--resume {run_dir}: not a run folder (no config.yaml in it)")
            if not checkpoints.checkpoint_folders(run_dir):
                raise SystemExit(f"--resume {run_dir}: no checkpoint saved there, nothing to resume; "
                                 f"start it afresh with --config {config_name}")
            checkpoints.find_checkpoint(run_dir, what="--resume: ", quiet=True)  # one that loads, or one line why
            cfg = load_config(config_name, args.set)
        else:
            cfg = load_config(args.config, args.set)
            config_name = str(config.find_config(args.config))
            name = cfg.run_name or f"{Path(args.config).stem}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(cfg.out_dir) / dist.from_main(name)  # rank 0's clock names the run
        if cfg.train.batch_size < dist.world:
            raise config.ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} problems cannot be "
                                     f"shared by {dist.world} processes (each takes whole problems); use at least "
                                     f"{dist.world}")
        check_paths_and_tasks(cfg, make_task)
        device = models.pick_device(cfg, config_name)  # a GPU recipe on a CPU machine stops here too
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    card_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if card_bytes and (why := plan.plan_refusal(cfg, card_bytes)):
        raise SystemExit(why)  # before the run folder: a run that cannot fit loses nothing
    trackers.check_trackers(cfg.log.report_to)  # a missing tracker stops us before the run folder exists
    return cfg, run_dir, config_name
