"""Checkpoints: save a step, find the newest one that loads, load and restore it, without running its code.

One folder per step, all of it data: the adapter (safetensors), the pool (JSON), trainer_state.pt (tensors,
read with weights_only=True) and trainer_state.json, so a run folder someone hands you runs none of its code.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from plumbing import seeds

STATE_FORMAT = 2
STATE_TYPES = {"step": int, "rng": dict, "streams": list, "totals": dict, "demo_buffer": list, "world": int,
               "kept_rollouts": list}
TENSOR_TYPES = {"optimizer": dict, "scheduler": dict, "torch_rng": torch.Tensor}


class CheckpointError(ValueError):
    """A checkpoint's trainer state that cannot be loaded safely; the message names the file and why."""


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, pool, extra: dict):
    """checkpoints/step_N/: the adapter, the prompt pool and its best prompt as text, and the trainer state
    (`extra` must be JSON). Written into step_N.tmp and renamed: a kill leaves the whole folder or none."""
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():  # left by a run killed while saving this same step
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    pool.save(tmp / "pool.json")
    (tmp / "best_prompt.txt").write_text(pool.context(pool.best()).text())  # for people: demos as text
    (tmp / "trainer_state.json").write_text(json.dumps(
        {"format": STATE_FORMAT, "step": step, **extra, "rng": seeds.rng_state()}))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    if ckpt.exists():  # a resumed run replaying a step it had saved before: same contents
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
    return ckpt


def _safe_torch_load(path: Path) -> dict:
    """torch.load that unpickles tensors and plain containers only."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        foreign = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(f"{path}: holds an object that is not plain data "
                              f"({foreign.group(1) if foreign else 'unknown type'}); refusing to unpickle it") from None
    except Exception as e:  # truncated or corrupted: every reader raises something different
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _check_types(state: dict, types: dict, path: Path) -> dict:
    for key, kind in types.items():
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: key {key!r} must be {kind.__name__}, got {type(state[key]).__name__}")
    return state


def load_trainer_state(ckpt: Path) -> dict:
    """A checkpoint folder's trainer state as one dict (STATE_TYPES, TENSOR_TYPES' keys), loading no code:
    CheckpointError naming the file for a foreign object, damage, a missing key, a wrong type or format."""
    ckpt, json_path = Path(ckpt), Path(ckpt) / "trainer_state.json"
    if not json_path.is_file():
        raise CheckpointError(f"{json_path} is missing" + (
            ": a checkpoint saved by an older fst (one pickle), which cannot be loaded safely; start the run "
            "afresh" if (ckpt / "trainer_state.pt").is_file() else ""))
    try:
        state = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{json_path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{json_path}: not a format-{STATE_FORMAT} trainer state")
    _check_types(state, STATE_TYPES, json_path)
    tensors = _check_types(_safe_torch_load(ckpt / "trainer_state.pt"), TENSOR_TYPES, ckpt / "trainer_state.pt")
    rng = state["rng"]
    if not (isinstance(rng.get("python"), list) and isinstance(rng.get("numpy"), list)):
        raise CheckpointError(f"{json_path}: key 'rng' must hold 'python' and 'numpy' lists")
    return state | {"optimizer": tensors["optimizer"], "scheduler": tensors["scheduler"],
                    "rng": {**rng, "torch": tensors["torch_rng"]},
                    "demo_buffer": [tuple(d) for d in state["demo_buffer"]]}


def restore_trainer_state(ckpt: Path, optimizer, scheduler, streams) -> dict:
    """Load `ckpt`'s trainer state into the optimiser, the scheduler and the data streams, and set the
    RNGs as saved; returns the state for the rest (step, counters, demo buffer, kept rollouts)."""
    state = load_trainer_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for stream, saved in zip(streams, state["streams"]):
        stream.load_state_dict(saved)
    seeds.set_rng_state(state["rng"])
    return state


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing, unreadable or not plain data), or None."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    from safetensors.torch import load_file
    try:
        load_file(ckpt / "adapter_model.safetensors")
        if (ckpt / "pool.json").exists():
            json.loads((ckpt / "pool.json").read_text())
    except Exception as e:  # truncated or corrupted: every reader raises something different
        return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    try:
        load_trainer_state(ckpt)
    except CheckpointError as e:
        return str(e).removeprefix(f"{ckpt}/").removeprefix(f"{ckpt}: ")
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, newest first (step_N.tmp, cut short by a kill, is not one)."""
    return sorted(Path(run_dir).glob("checkpoints/step_*[0-9]"), reverse=True)


def latest_checkpoint(run_dir: Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint that can be resumed from; damaged ones are skipped, said once an older one is used."""
    skipped = []
    for ckpt in checkpoint_folders(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for damaged, why in [] if quiet else skipped:
                print(f"[fst] skipping damaged checkpoint {damaged}: {why}", file=sys.stderr)
            return ckpt
        skipped.append((ckpt, problem))
    return None


def find_checkpoint(path, step: int | None = None, what: str = "", quiet: bool = False) -> Path:
    """A checkpoint folder itself, or a run folder's checkpoint of `step` (default: its latest usable one),
    whose trainer state loads safely; else SystemExit with one line, prefixed by `what` ("init_from: ")."""
    p = Path(path)
    if step is None:
        ckpt = p if (p / "adapter_config.json").exists() else latest_checkpoint(p, quiet)
        if ckpt is None and checkpoint_folders(p):  # every one damaged: say what is wrong with the newest
            newest = checkpoint_folders(p)[0]
            raise SystemExit(f"{what}no usable checkpoint in {p}; the newest, {newest.name}: "
                             f"{checkpoint_problem(newest)}")
        if ckpt is None:
            raise SystemExit(f"{what}no checkpoint found in {p} (has this run saved a complete one yet?)")
    else:
        ckpt = p / "checkpoints" / f"step_{step:06d}"
        if not ckpt.is_dir():
            have = sorted(c.name for c in (p / "checkpoints").glob("step_*"))
            raise SystemExit(f"{what}{ckpt} not found; saved: {', '.join(have) or 'none'}")
    try:
        load_trainer_state(ckpt)
    except CheckpointError as e:
        raise SystemExit(f"{what}{e}") from None
    return ckpt
