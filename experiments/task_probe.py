"""task_probe.py -- one job: how often is the BASE model fully right on each task, before any training?

    python experiments/task_probe.py                                   # registered tasks, SmolLM2-135M
    python experiments/task_probe.py --tasks arithmetic compare --n 32 --k 4
    python experiments/task_probe.py --tasks add --option example_in=system --out results/miniature/floor_probe.json

The miniature studies (experiments/miniature.py) need tasks the base model gets right sometimes
(5-40%): at 0% RL sees no reward to learn from, near 100% there is nothing left to learn. Each task is
measured with its own default prompt and with the task-agnostic prompt that a continual run starts
from; accuracy = share of samples with reward >= 1 (eval.evaluate), so partial credit never counts.
Writes a JSON file (default results/miniature/base_accuracy.json) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
from plumbing import models  # noqa: E402
import fst  # noqa: E402
import rewards  # noqa: E402

GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"  # local copy; the hub is unreachable


def make_task(name: str, n: int, options: dict | None = None):
    if name == "gsm8k":
        return rewards.get_task("gsm8k", train_path=str(GSM8K_TEST), test_path=str(GSM8K_TEST))
    # The test split is generated first from its own seed, so its first n problems are the same
    # whatever the split sizes: generating only what is measured changes nothing.
    return rewards.get_task(name, seed=0, n_train=1, n_test=n, **(options or {}))


def variant(name: str, options: dict) -> str:
    """The result's key for a task built with options: `add[example_in=system]`."""
    return name + (f"[{','.join(f'{k}={v}' for k, v in options.items())}]" if options else "")


def probe_task(model, tok, name, *, n, k, temperature, max_new_tokens, seed=0, extra_prompts=None,
               options=None) -> dict:
    """{prompt kind: evaluate() dict + seconds} on the first n test problems of one task.
    extra_prompts: {kind: text} measured besides the default and task-agnostic prompts; options: the
    task's constructor keywords (task.options in a config)."""
    task = make_task(name, n, options)
    problems = task.load("test")[:n]
    prompts = {"default": task.default_system_prompt, "agnostic": rewards.TASK_AGNOSTIC_PROMPT} | (extra_prompts or {})
    out = {}
    for kind, text in prompts.items():
        t0 = time.perf_counter()
        res = evaluation.evaluate(model, tok, task, problems, text, k=k, max_new_tokens=max_new_tokens,
                                  temperature=temperature, generator=torch.Generator().manual_seed(seed),
                                  use_adapter=False)
        out[kind] = {**res, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[probe] {name:12s} {kind:8s} accuracy {res['accuracy']:.3f}  mean reward "
              f"{res['mean_at_k']:.3f}  pass@{k} {res['pass_at_k']:.3f}  ({out[kind]['seconds']:.0f} s)",
              file=sys.stderr)
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Base {s['model']}, first {s['n']} test problems x {s['k']} samples, temperature "
             f"{s['temperature']}, max_new_tokens {s['max_new_tokens']}; accuracy = share of samples fully "
             "right (reward >= 1).", "",
             "| task | task's default prompt | task-agnostic prompt | other prompt |", "|---|---|---|---|"]
    for name, r in result["tasks"].items():
        other = ", ".join(f"{r[kind]['accuracy']:.3f} ({kind})" for kind in r if kind not in ("default", "agnostic"))
        lines.append(f"| {name} | {r['default']['accuracy']:.3f} | {r['agnostic']['accuracy']:.3f} | {other} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=sorted(rewards.TASKS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config-prompt", metavar="YAML", default="configs/tiny.yaml",
                    help="also measure this config's seed prompt on its own task ('' = skip)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a task option (task.options; YAML value) for every task probed; the result's key "
                         "names it, e.g. add[example_in=system]")
    ap.add_argument("--prompt", action="append", default=[], metavar="LABEL=TEXT",
                    help="one more seed prompt to measure on every task, named LABEL")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "miniature" / "base_accuracy.json")
    args = ap.parse_args(argv)
    options = {key: yaml.safe_load(value) for key, _, value in (o.partition("=") for o in args.option)}
    prompts = dict(p.partition("=")[::2] for p in args.prompt)
    torch.set_num_threads(args.threads)
    model, tok = models.load_model(models.ModelConfig(name=args.model, dtype="float32"), torch.device("cpu"))
    extra = {}
    if args.config_prompt:
        cfg = fst.load_config(args.config_prompt)
        if cfg.task.system_prompt:
            extra[cfg.task.name] = {Path(args.config_prompt).name: cfg.task.system_prompt}
    settings = {"model": args.model, "n": args.n, "k": args.k, "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens}
    result = {"settings": settings, "tasks": {}, "commands": {}}
    if args.out.exists():  # keep earlier measurements of other tasks made with the same settings
        old = json.loads(args.out.read_text())
        if {key: old["settings"].get(key) for key in settings} == settings:
            result["tasks"], result["commands"] = old["tasks"], old.get("commands", {})
    command = "python experiments/task_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:  # written after each task: a long probe that is stopped keeps what it measured
        key = variant(name, options)
        result["tasks"][key] = probe_task(model, tok, name, n=args.n, k=args.k, temperature=args.temperature,
                                          max_new_tokens=args.max_new_tokens, options=options,
                                          extra_prompts=extra.get(name, {}) | prompts)
        result["commands"][key] = command
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
