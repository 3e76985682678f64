"""demo_probe.py -- one job: how much do worked examples in the context lift a policy, and in which form?

    python experiments/demo_probe.py                                   # base SmolLM2-135M, 4 tasks
    python experiments/demo_probe.py --tasks add --adapter RUN_DIR     # a trained policy (its last checkpoint)

The fast weights are contexts: an instruction plus worked examples (pool.Context). This measures,
for each task, accuracy (share of samples fully right) on its first n test problems x k samples with the
task's own default prompt and its example turn kept, plus 1, 3 and 5 worked examples from the train
split, shown either inside the system message ("system") or as user/assistant turns before the problem
("turns"). The same examples in the same order for every count (the first 5 of a fixed draw), and the
same sampling draws in every cell, so cells differ only by the context. Examples are gold solutions
written from the task's own rule ("46 + 27 = 73.\nAnswer: 73"), or, with --own, the policy's own fully
rewarded answers to train problems (what the demo operators bootstrap). The numbers pick
fast.demo_format's default. Writes results/miniature/demo_probe.json (one entry per policy and source)
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import context_opt  # noqa: E402
import eval as evaluation  # noqa: E402
from plumbing import checkpoints, models  # noqa: E402
from pool import Context  # noqa: E402
import rewards  # noqa: E402

COUNTS = (0, 1, 3, 5)
FORMATS = ("system", "turns")


def gold_demos(task, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n worked examples from the train split, solved by the task's own rule."""
    problems = random.Random(seed).sample(task.load("train"), n)
    return [(p["question"], f"{p['rule'][0].upper()}{p['rule'][1:]}.\nAnswer: {p['answer']}") for p in problems]


def own_demos(model, tok, task, n: int, *, temperature: float, max_new_tokens: int, seed: int = 0):
    """n of the policy's own fully rewarded answers to train problems, cut to their answer line (as the
    demo operators make them)."""
    pool = random.Random(seed).sample(task.load("train"), 8 * n)
    gen = torch.Generator().manual_seed(seed)
    answers = context_opt.make_evaluate(model, tok, task, max_new_tokens=max_new_tokens, temperature=temperature,
                                        generator=gen)([task.default_system_prompt] * len(pool), pool)
    right = [(p["question"], context_opt.cut_to_answer(text)) for p, (text, reward, _) in zip(pool, answers)
             if reward >= 1.0]
    return right[:n]


def probe(model, tok, name: str, demos, *, n: int, k: int, temperature: float, max_new_tokens: int) -> dict:
    task = rewards.get_task(name, seed=0, n_train=5000, n_test=n)
    problems = task.load("test")[:n]
    out = {}
    for count in COUNTS:
        for form in FORMATS if count else ("none",):
            context = Context(task.default_system_prompt, tuple(demos[:count]),
                                          "turns" if form == "none" else form)
            t0 = time.perf_counter()
            res = evaluation.evaluate(model, tok, task, problems, context, k=k, max_new_tokens=max_new_tokens,
                                      temperature=temperature, generator=torch.Generator().manual_seed(0))
            out[f"{count}/{form}"] = {**res, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"[demo_probe] {name:12s} {count} demos {form:6s} accuracy {res['accuracy']:.3f}", file=sys.stderr)
    return out


def markdown(entry: dict) -> str:
    lines = [f"{entry['policy']}, {entry['source']} examples; accuracy on the first {entry['n']} test problems "
             f"x {entry['k']} samples (T {entry['temperature']}, {entry['max_new_tokens']} tokens)", "",
             "| task | 0 | 1 system | 1 turns | 3 system | 3 turns | 5 system | 5 turns |", "|---|" + "---|" * 7]
    for name, cells in entry["tasks"].items():
        keys = ["0/none"] + [f"{c}/{f}" for c in COUNTS[1:] for f in FORMATS]
        lines.append(f"| {name} | " + " | ".join(f"{cells[key]['accuracy']:.3f}" for key in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["add", "compare", "word_count", "alphabetical"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    ap.add_argument("--own", action="store_true", help="the policy's own rewarded answers instead of gold ones")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "miniature" / "demo_probe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapter = checkpoints.find_checkpoint(args.adapter) if args.adapter else None
    model, tok = models.load_model(models.ModelConfig(name=args.model, dtype="float32"), torch.device("cpu"),
                                   adapter_path=str(adapter) if adapter else None)
    model.eval()
    policy = f"trained ({args.adapter.name})" if adapter else f"base {args.model}"
    entry = {"policy": policy, "source": "own" if args.own else "gold", "n": args.n, "k": args.k,
             "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "tasks": {},
             "command": "python experiments/demo_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    sampling = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    for name in args.tasks:  # written after each task: a stopped probe keeps what it measured
        task = rewards.get_task(name)
        demos = own_demos(model, tok, task, max(COUNTS), **sampling) if args.own else gold_demos(task, max(COUNTS))
        entry["tasks"][name] = probe(model, tok, name, demos, n=args.n, k=args.k, **sampling)
        entry["tasks"][name]["demos"] = demos
        result[f"{policy} / {entry['source']}"] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(entry))


if __name__ == "__main__":
    main()
