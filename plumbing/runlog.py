"""The run's record: its folder, metrics.jsonl and samples.jsonl, the end-of-run summary, timers, progress.

Rank 0 writes; metrics.jsonl is the record every plot, tracker and summary is made from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

from plumbing import trackers


@contextlib.contextmanager
def timed(seconds: dict, key: str):
    """seconds[key] = the wall time of the block."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = time.perf_counter() - t0


def logged(run_dir: Path, kind: str, step: int) -> bool:
    """Whether metrics.jsonl holds a row of this kind and step (a resumed run: was it written?)."""
    return any(row.get("kind") == kind and row.get("step") == step for row in read_metrics(run_dir))


def truncate_jsonl(path: Path, resume_step: int):
    """On resume, drop the lines written after the checkpoint (steps >= resume_step, and a last line a kill
    cut in half). An eval row's `step` counts updates done: step == resume_step came before the checkpoint."""
    if not path.exists():
        return
    keep = [line for line, row in _lines(path) if row["step"] - (row.get("kind") == "eval") < resume_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _lines(path: Path) -> list[tuple[str, dict]]:
    """A .jsonl file's (line, row) pairs; a line a kill cut in half (only the last can be) is skipped."""
    pairs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            pairs.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return pairs


def counted(fn, totals: dict, key: str):
    """fn(items, ...) that adds len(items) to totals[key]: a batched call counts each item."""
    def wrapped(items, *args, **kwargs):
        totals[key] += len(items)
        return fn(items, *args, **kwargs)
    return wrapped


class RunLog:
    """A run's record: metrics.jsonl (a row per step, fast round and validation), samples.jsonl, and the
    trackers of log.report_to. Rank 0 alone writes; a resumed run (first_step > 0) first truncates."""

    def __init__(self, run_dir: Path, log_cfg, config: dict, first_step: int = 0, main: bool = True,
                 on_close=None):
        self.main, self.on_close = main, on_close  # on_close(): rank 0, after the files are closed (a summary)
        if main and first_step:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(run_dir / name, first_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a") if main else None
        self.sample_file = open(run_dir / "samples.jsonl", "a") if main else None
        self.trackers = trackers.Trackers(log_cfg if main else dataclasses.replace(log_cfg, report_to=[]),
                                          run_dir, config, first_step=first_step)

    def row(self, row: dict):
        if self.main:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            self.trackers.log(row)

    def samples(self, exp, step: int, n: int):
        """samples.jsonl rows of a step's Experience: the first rollout of each of its first n problems."""
        if not self.main:
            return
        group, rows = exp.group.tolist(), []
        for g in range(min(n, len(exp.problems))):
            i = group.index(g)
            rows.append({"step": step, "problem_id": exp.problems[g]["id"], "prompt_id": exp.prompt_id[i],
                         "question": exp.problems[g]["question"], "completion": exp.rollouts.texts[i],
                         "reward": exp.scored[i][0], "feedback": exp.scored[i][1]})
        self.sample_file.write("".join(json.dumps(row) + "\n" for row in rows))
        self.sample_file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.metrics, self.sample_file):
            if f is not None:
                f.close()
        self.trackers.close()
        if self.main and self.on_close is not None:
            self.on_close()


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl rows; rows without "kind" are train rows; a half-written last line is skipped."""
    return [row for _, row in _lines(Path(run) / "metrics.jsonl")]


def reflector_used(run: Path) -> dict | None:
    """Which reflector wrote the run's proposals (from its fast rows) and what it cost: calls, tokens, seconds,
    the model ids that answered and the failed calls. None for a run without fast rounds (rl)."""
    fast = [r for r in read_metrics(run) if r.get("kind") == "fast"]
    if not fast:
        return None
    itemised = [c for r in fast for c in r.get("reflector_replies", [])]
    return {"reflector": fast[-1].get("reflector", "unrecorded"), "calls": fast[-1].get("reflector_calls", 0),
            "tokens": sum(r.get("reflector_tokens", 0) for r in fast),
            "seconds": round(sum(r.get("seconds_reflecting", 0.0) for r in fast), 1),
            "models": sorted({c["model"] for c in itemised}), "failed_calls": sum(bool(c["error"]) for c in itemised)}


def reflector_line(used: dict) -> str:
    """reflector_used() in words: openai:qwen (answered as qwen2.5-7b): 24 calls, 3100 tokens, 41 s, 1 failed."""
    models = f" (answered as {', '.join(used['models'])})" if used["models"] else ""
    failed = f", {used['failed_calls']} failed (reflector_error)" if used["failed_calls"] else ""
    return (f"{used['reflector']}{models}: {used['calls']} calls, {used['tokens']} tokens, "
            f"{used['seconds']:.0f} s{failed}")


FLOOR = 0.2  # held-out accuracy that counts as having left the floor (results/README.md: study 4's threshold)


def summarize(run: Path, best_context: dict | None = None) -> str:
    """What a run did (held-out accuracy before -> after, KL to base, the best context, where the time went,
    what to run next), written as RUN/summary.json; returns the text."""
    run, rows = Path(run), read_metrics(run)
    train = [r for r in rows if r.get("kind", "train") == "train"]
    if not train:
        return f"[fst] {run}: no step finished, nothing to summarise"
    evals = [r for r in rows if r.get("kind") == "eval"]
    held_out = {}
    for r in evals:
        cell = held_out.setdefault(r["task"], {}).setdefault(r["prompt"], {"before": r["accuracy"]})
        cell |= {"after": r["accuracy"], "steps": [cell.get("steps", [r["step"]])[0], r["step"]],
                 "n": r["n"], "k": r["k"]}
        if r["accuracy"] >= FLOOR and "left_floor_at" not in cell:  # a start near zero reward: when it got out
            cell["left_floor_at"] = r["step"]
    # {task: "seed" / "best" / "tie"}: which prompt did better at the last validation (rl has seed alone)
    better = {task: "best" if c["best"]["after"] > c["seed"]["after"] else
              "seed" if c["seed"]["after"] > c["best"]["after"] else "tie"
              for task, c in held_out.items() if {"seed", "best"} <= set(c)}
    fast = sum(r.get("seconds_fast", 0.0) for r in train)
    out = {"run": str(run), "steps_done": train[-1]["step"] + 1, "mode": train[-1]["mode"],
           "held_out_accuracy": held_out, "better_at_end": better, "kl_to_base": train[-1]["kl_to_base"],
           "best_context": best_context, "reflector": reflector_used(run),
           "seconds": {"rl_steps": round(sum(r["seconds_step"] for r in train) - fast, 1),
                       "fast_rounds": round(fast, 1), "fast_round_count": sum(r.get("kind") == "fast" for r in rows)},
           "next": [f"python eval.py {run}", f"python eval.py compare {run} OTHER_RUN --out plots/",
                    f"python eval.py export {run} --out DIR"]}
    (run / "summary.json").write_text(json.dumps(out, indent=1))
    return summary_text(out)


def print_summary(run: Path, best_of_run) -> None:
    """The end of every run, an interrupted one too: its summary, printed and saved (summary.json)."""
    print(summarize(run, best_of_run(run)), file=sys.stderr)


PROMPT_NAMES = {"seed": "seed prompt", "best": "best context"}  # validation rows' "prompt" field, in words


def summary_text(out: dict) -> str:
    lines = [f"[fst] summary of {out['run']} ({out['mode']}, {out['steps_done']} steps):"]
    for task, cells in out["held_out_accuracy"].items():
        shown = ", ".join(f"{PROMPT_NAMES[which]} {c['before']:.2f} -> {c['after']:.2f}"
                          for which, c in cells.items())
        c = next(iter(cells.values()))
        better = out.get("better_at_end", {}).get(task)
        verdict = "" if better is None else "; at the end: a tie" if better == "tie" else \
            f"; at the end the {PROMPT_NAMES[better]} did better"
        lines.append(f"  held-out accuracy on {task} ({c['n']} problems x {c['k']}, steps {c['steps'][0]} -> "
                     f"{c['steps'][1]}): {shown}{verdict}")
        deployed = cells.get("best", c)  # what RL sampled with: the best context in fst, the seed prompt in rl
        lines.append(f"    first at accuracy >= {FLOOR} (the {PROMPT_NAMES['best' if 'best' in cells else 'seed']}): "
                     + (f"step {deployed['left_floor_at']}" if "left_floor_at" in deployed else "never"))
    lines.append(f"  KL to base at the end: {out['kl_to_base']:.4f}")
    if out["best_context"]:
        b = out["best_context"]
        first = " / ".join(b["instruction"].strip().splitlines()[:2])
        lines.append(f"  best context: \"{first[:100]}\" + {b['demos']} worked example(s); lineage "
                     f"{' -> '.join(b['lineage'])} (born at step {b['born_step']})")
    if out.get("reflector"):
        lines.append(f"  reflector: {reflector_line(out['reflector'])}")
    t = out["seconds"]
    lines.append(f"  wall time: {t['rl_steps'] / 60:.1f} min RL steps, {t['fast_rounds'] / 60:.1f} min in "
                 f"{t['fast_round_count']} fast round(s) (validation not counted)")
    lines += ["  next:"] + [f"    {cmd}" for cmd in out["next"]] + [f"  (also written to {out['run']}/summary.json)"]
    return "\n".join(lines)


class RoundProgress:
    """A fast round's progress line under the step bar: proposals, budget spent, accepted, best anchor score."""

    def __init__(self, step: int, show: bool = True):
        from tqdm import tqdm
        # until the first report (after the live pool's scoring) there is no budget to count against
        self.bar = tqdm(total=1, desc=f"fast round @ step {step}", position=1, leave=False, disable=not show,
                        bar_format="{desc}: scoring the live pool on the anchors")

    def __call__(self, *, proposals: int, spent: int, budget: int, accepted: int, best: float):
        self.bar.bar_format = "{desc}: {n}/{total} rollouts of budget {bar:10} {postfix}"
        self.bar.total, self.bar.n = budget, min(spent, budget)
        self.bar.set_postfix_str(f"{proposals} proposals, {accepted} accepted, best anchor {best:.2f}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def make_run_folder(run_dir: Path, config: dict, dist) -> None:
    """Rank 0 creates the run folder and writes config.yaml (whole, by rename); the other ranks wait for it."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
        print(f"[fst] run folder: {run_dir}" + (f" ({dist.world} processes)" if dist.world > 1 else ""),
              file=sys.stderr)
    dist.gather([])
