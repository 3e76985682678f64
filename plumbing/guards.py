"""Guards: a run that cannot learn stops loudly instead of training nothing, and Ctrl-C never loses a step.

The update guards (no gradient flow on the first update, three non-finite updates in a row) raise
TrainingError; Ctrl-C and running out of GPU memory save the last whole step before the run exits.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plumbing import checkpoints


class TrainingError(RuntimeError):
    """The run cannot go on (no gradient flow, repeated non-finite updates); the message says why."""


def lora_gradient_problems(model) -> list[str]:
    """After a backward: the LoRA tensors with no gradient, a non-finite one, or an all-zero one on lora_B
    (lora_A's is exactly zero while B is zero, as at initialisation)."""
    problems = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            problems.append(f"{name}: no gradient")
        elif not torch.isfinite(p.grad).all():
            problems.append(f"{name}: non-finite gradient")
        elif "lora_B" in name and not p.grad.abs().sum() > 0:
            problems.append(f"{name}: zero gradient")
    return problems


def check_gradient_flow(model, step: int):
    """Stop the run on its first update if some LoRA layer does not learn."""
    problems = lora_gradient_problems(model)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise TrainingError(
            f"gradient-flow check failed on the first update (step {step}): {shown}. Likely causes: a base "
            "layer whose kernel has no autograd (bitsandbytes 4-bit on CPU: see "
            "models.keep_4bit_layers_differentiable), a module run under no_grad or detached, or frozen LoRA weights.")


@dataclass
class UpdateGuard:
    """The guards' state across updates: the first update of a run (or of a resumed run) must reach
    every LoRA layer, and a non-finite update is skipped, three in a row stop the run."""
    run_dir: Path | None = None    # its last good checkpoint is named when the run stops
    gradients_checked: bool = False
    bad_updates: list[int] = field(default_factory=list)  # steps of the current streak of skipped updates

    def step(self, model, optimizer, scheduler, loss_value: float, step: int, has_signal: bool,
             max_grad_norm: float = 0.0, dist=None) -> str | None:
        """After the backward passes: sum the gradients over ranks (dist), run check, then either drop them
        (returns why) or clip them (max_grad_norm > 0) and step the optimizer and scheduler (returns None)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if dist is not None:
            dist.sum_gradients(params)
        skipped = self.check(model, params, loss_value, step, has_signal=has_signal)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            return skipped
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        return None

    def check(self, model, params, loss_value: float, step: int, has_signal: bool = True) -> str | None:
        """Why this update must be skipped, or None. The gradient-flow check waits for a non-zero advantage
        (has_signal): at initialisation one whose advantages are all zero has zero gradients everywhere."""
        skipped = ("non-finite loss" if not math.isfinite(loss_value) else "non-finite gradients"
                   if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params) else None)
        if skipped:
            self.bad_updates.append(step)
            if len(self.bad_updates) >= 3:
                last = checkpoints.latest_checkpoint(self.run_dir) if self.run_dir else None
                raise TrainingError(f"{skipped} at steps {self.bad_updates[-3:]}: stopped after three "
                                    f"in a row; the last good checkpoint is {last}")
            return skipped
        self.bad_updates.clear()
        if not self.gradients_checked and has_signal:
            check_gradient_flow(model, step)
            self.gradients_checked = True
        return None


@contextlib.contextmanager
def interrupt_held():
    """Ctrl-C inside the block takes effect at its end, so a step's metrics row and its completion mark land
    together (only the main thread receives signals; elsewhere the block runs as is)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(caught[0], None)   # Python's own handler raises KeyboardInterrupt here
    elif caught and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


@contextlib.contextmanager
def checkpoint_on_interrupt(save, run_dir: Path, stop_errors: tuple = ()):
    """Ctrl-C inside the block saves the last whole step and exits with 130; out of GPU memory saves it and
    names the keys to lower; an error of `stop_errors` saves it and goes on up. The loop sets
    `progress.done` (the last whole step) and `progress.undo` (un-reads an unfinished step's batch)."""
    progress = types.SimpleNamespace(done=None, undo=None)

    def save_last_step() -> str:
        if progress.undo is not None:
            progress.undo()
        if progress.done is None:
            return "no step had finished, nothing saved"
        save(progress.done)
        return f"saved step {progress.done} in {run_dir}"
    try:
        yield progress
    except KeyboardInterrupt:
        print(f"\n[fst] interrupted: {save_last_step()}; resume with: python fst.py --resume {run_dir}",
              file=sys.stderr)
        raise SystemExit(130)
    except torch.OutOfMemoryError as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "torch.OutOfMemoryError"
        # its traceback keeps the failed frames' tensors (KV caches, logits) alive: free them first
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        torch.cuda.empty_cache()  # room to save the step; a no-op without CUDA
        raise SystemExit(f"[fst] out of memory ({first}): {save_last_step()}. Lower sampling.max_rows (sampler "
                         f"calls: RL step, fast round, validation) or train.micro_batch (training); `python fst.py "
                         f"--config CONFIG --plan` shows each phase's peak. Then: python fst.py --resume {run_dir} "
                         f"--set sampling.max_rows=N") from e
    except stop_errors as e:
        traceback.clear_frames(e.__traceback__)
        print(f"\n[fst] stopped: {save_last_step()}; resume with: python fst.py --resume {run_dir}", file=sys.stderr)
        raise
