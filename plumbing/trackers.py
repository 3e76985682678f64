"""Live curves: every metrics.jsonl row also goes to the trackers of `log.report_to` (TensorBoard, W&B).

Rows become `<kind>/<key>` numbers, with the fast loop's accepted prompts as text and the run's config.
metrics.jsonl stays the record: a tracker that fails mid-run is dropped with one warning.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


@dataclass
class LogConfig:
    """The config's `log` section (fst.Config.log)."""
    # Live curves: any of tensorboard, wandb (optional installs); metrics.jsonl is always written.
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    project: str = "fst"  # the W&B project the run goes to


def tracker_scalars(row: dict) -> dict[str, float]:
    """A metrics row -> {name: number}: `train/kl_to_base`, nested dicts flattened with '/'
    (`train/reward_by_prompt/3`), eval rows under their task and prompt (`eval/gsm8k/best/pass_at_k`).
    Strings, lists, None, the step (the x axis) and an eval row's rollout counters (the train rows'
    curves have them) are left out."""
    kind = row.get("kind", "train")
    prefix = f"eval/{row.get('task')}/{row.get('prompt')}" if kind == "eval" else kind
    counters = ("rollouts_rl", "rollouts_fast", "reflector_calls", "rollouts_reused") if kind == "eval" else ()
    out = {}

    def add(name, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value

    for key, value in row.items():
        if key not in ("kind", "step", *counters):
            add(f"{prefix}/{key}", value)
    return out


class _TensorBoardTracker:
    package = "tensorboard"  # torch.utils.tensorboard, which writes the event files, needs it

    def __init__(self, run_dir: Path, config: dict, first_step: int, project: str):
        from torch.utils.tensorboard import SummaryWriter
        # The event file sits in the run folder, so `tensorboard --logdir runs/` names curves by run.
        # purge_step: a resumed run hides what the interrupted one logged from its first step on...
        self.writer = SummaryWriter(str(run_dir), purge_step=first_step or None)
        self.text("config", yaml.safe_dump(config, sort_keys=False), first_step)
        metrics = run_dir / "metrics.jsonl"
        if first_step and metrics.exists():  # ...but rows metrics.jsonl kept there (validation) come back
            for row in map(json.loads, metrics.read_text().splitlines()):
                if row["step"] >= first_step:
                    self.log(tracker_scalars(row), row["step"])

    def log(self, scalars: dict, step: int):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # live: a row a step is cheap to write now

    def text(self, name: str, text: str, step: int):
        # TensorBoard renders markdown; indented lines show the prompt verbatim.
        self.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _WandbTracker:
    package = "wandb"

    def __init__(self, run_dir: Path, config: dict, first_step: int, project: str):
        import wandb
        self.wandb = wandb
        # --resume continues the same W&B run: its id is kept next to W&B's own files.
        id_file = run_dir / "wandb" / "fst_run_id"
        resuming = first_step > 0 and id_file.exists()
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                              id=id_file.read_text().strip() if resuming else None,
                              resume="allow" if resuming else None,
                              settings=wandb.Settings(console="off"))  # leave stdout and tqdm alone
        id_file.parent.mkdir(exist_ok=True)
        id_file.write_text(self.run.id)

    def log(self, scalars: dict, step: int):
        self.run.log(scalars, step=step)

    def text(self, name: str, text: str, step: int):
        self.run.log({name: self.wandb.Table(columns=["step", "text"], data=[[step, text]])}, step=step)

    def close(self):
        self.run.finish()


TRACKERS = {"tensorboard": _TensorBoardTracker, "wandb": _WandbTracker}


def check_trackers(names) -> None:
    """Start-up check, before the run folder exists: every requested tracker is installed."""
    for name in names:
        package = TRACKERS[name].package
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"log.report_to lists {name}, which is not installed: pip install {package} "
                             f"(or drop it from log.report_to)")


class Trackers:
    """The trackers of `log.report_to` behind one call per metrics row. A tracker that cannot start
    stops the run at once (better than hours without curves); one that raises later is dropped."""

    def __init__(self, cfg, run_dir: Path, config: dict, first_step: int = 0):
        check_trackers(cfg.report_to)
        self.active = {}
        for name in dict.fromkeys(cfg.report_to):
            try:
                self.active[name] = TRACKERS[name](run_dir, config, first_step, cfg.project)
            except Exception as e:
                self.close()
                reason = (str(e).strip().splitlines() or [""])[0]
                raise SystemExit(f"log.report_to: {name} could not start: {type(e).__name__}: {reason}") from e

    def log(self, row: dict):
        step = int(row.get("step", 0))
        self._each("log", tracker_scalars(row), step)
        if row.get("accepted_prompts"):  # a fast round's new prompts, readable next to the curves
            self._each("text", "fast/accepted_prompts", "\n\n----\n\n".join(row["accepted_prompts"]), step)

    def close(self):
        self._each("close")
        self.active = {}

    def _each(self, method: str, *args):
        for name in list(self.active):
            try:
                getattr(self.active[name], method)(*args)
            except Exception as e:
                del self.active[name]
                print(f"[fst] warning: {name} failed ({type(e).__name__}: {e}); it gets nothing more from "
                      f"this run, which goes on (metrics.jsonl has every row)", file=sys.stderr)
