"""bench/batch_scoring.py -- one job: what the fast loop costs a run, rl against fst with fast.scoring=batch
(and, with --rounds, fst with the paper's scoring rounds), side by side on this machine.

    python bench/batch_scoring.py --threads 1              # rl vs fst-batch, 12 steps each, one pair
    python bench/batch_scoring.py --threads 1 --rounds     # + fst with fast.scoring=rounds (fast.reuse=none)
    python bench/batch_scoring.py --pairs 2 --steps 18     # two pairs (order alternates), study 1's length
    python bench/batch_scoring.py --steps 18 --sides fst-batch fst-batch-ev   # + trial rows out of the loss

Every side is fst's own run, `python fst.py --config configs/tiny.yaml` (SmolLM2-135M, task add as in study
1, B = 2 problems x G = 8 rollouts, a fast round every 6 steps) with validation off, in its own process with
the same thread count and seed, so all sides make the same RL steps on the same batches; what differs is
the fast loop each arm adds to them (nothing for rl). A side's time is the sum of its steps' seconds_step
(sampling, KL pass, update and fast round; loading and validation left out). Per pair the script prints
each side over rl as a ratio: the issue's "wall time per run" of an arm at the same RL work. Sides run one
after another, their order reversed in every other pair; run nothing else meanwhile. JSON goes to
bench/out/batch_scoring.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = {"rl": ["mode=rl"], "fst-batch": ["mode=fst", "fast.scoring=batch", "fast.reuse=none"],
         "fst-batch-ev": ["mode=fst", "fast.scoring=batch", "fast.reuse=none", "fast.train_on_trials=false"],
         "fst-rounds": ["mode=fst", "fast.scoring=rounds", "fast.reuse=none"]}
STUDY1 = ["task.name=add", "task.system_prompt=''", "eval.every=0", "device=cpu"]   # study 1's task, no validation


def child_main(a) -> None:
    """In its own process: one side's run through fst.main, on a.threads threads."""
    import torch
    torch.set_num_threads(a.threads)
    import fst
    sets = [*SIDES[a.child], *STUDY1, f"train.steps={a.steps}", f"train.seed={a.seed}",
            f"train.save_every={a.steps}", f"out_dir={a.out}", f"run_name={a.child}", *a.set]
    fst.main(["--config", str(ROOT / "configs" / "tiny.yaml"), *[x for s in sets for x in ("--set", s)]])


def side_numbers(run_dir: Path) -> dict:
    """A finished side's cost from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind", "train") == "train"]
    last = train[-1]
    return {"steps": len(train), "seconds_steps": round(sum(r["seconds_step"] for r in train), 1),
            "seconds_fast": round(sum(r.get("seconds_fast", 0.0) for r in train), 1),
            # where the RL steps' own time went: an arm that mixes contexts prefills and trains more prompts
            **{key: round(sum(r[key] for r in train), 1) for key in ("seconds_sampling", "seconds_base_kl",
                                                                      "seconds_training")},
            "completion_len_mean": round(sum(r["completion_len_mean"] for r in train) / len(train), 1),
            "rollouts_rl": last["rollouts_rl"], "rollouts_fast": last["rollouts_fast"],
            "reflector_tokens": last.get("reflector_tokens", 0), "reflector_calls": last.get("reflector_calls", 0),
            "fast_rounds": sum(r.get("kind") == "fast" for r in rows)}


def run_side(side: str, a, scratch: Path) -> dict:
    out = scratch / side
    cmd = [sys.executable, __file__, "--child", side, "--out", str(out), "--threads", str(a.threads),
           "--steps", str(a.steps), "--seed", str(a.seed), *[x for s in a.set for x in ("--set", s)]]
    print(f"[bench] {side}: {a.steps} steps, {a.threads} thread(s)", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # fst's own progress and summary: stderr
    return side_numbers(out / side)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every side (the same for all)")
    ap.add_argument("--steps", type=int, default=12, help="RL steps of every side (a fast round every 6)")
    ap.add_argument("--pairs", type=int, default=1, help="repetitions; the order of the sides alternates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", action="store_true", help="also fst with the paper's scoring rounds")
    ap.add_argument("--sides", nargs="+", default=["fst-batch"], choices=["fst-batch", "fst-batch-ev"],
                    help="the batch-scoring sides beside rl (fst-batch-ev: fast.train_on_trials=false)")
    ap.add_argument("--set", action="append", default=[], help="an fst override for every side (key=value)")
    ap.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a)
    sides = ["rl", *a.sides, *(["fst-rounds"] if a.rounds else [])]
    pairs = []
    for n in range(a.pairs):
        with tempfile.TemporaryDirectory() as scratch:
            order = sides if n % 2 == 0 else sides[::-1]
            numbers = {side: run_side(side, a, Path(scratch) / f"pair{n}") for side in order}
        ratios = {side: round(numbers[side]["seconds_steps"] / numbers["rl"]["seconds_steps"], 3)
                  for side in sides if side != "rl"}
        pairs.append({"order": order, "sides": numbers, "over_rl": ratios})
        print(f"pair {n}: " + ", ".join(f"{s} {numbers[s]['seconds_steps']:.0f} s" for s in sides) + "; over rl: "
              + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()))
    median = {side: statistics.median(p["over_rl"][side] for p in pairs) for side in sides if side != "rl"}
    print("median over rl: " + ", ".join(f"{s} {r:.2f}x" for s, r in median.items()))
    import platform
    result = {"command": "python bench/batch_scoring.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": a.steps, "threads": a.threads, "seed": a.seed, "machine": platform.processor() or platform.machine(),
              "pairs": pairs, "median_over_rl": median}
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "batch_scoring.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
