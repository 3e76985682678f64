"""bench/data_parallel.py -- one job: seconds per RL step, one process x 2 threads against 2 processes x 1
thread (torchrun, gloo), on the same cores.

    python bench/data_parallel.py                       # tiny.yaml (SmolLM2-135M), 2 pairs, 1 + 4 steps
    python bench/data_parallel.py --set train.batch_size=4 --threads 4 --procs 4

Both sides run fst itself, `fst.py --config tiny.yaml --set mode=rl`, in processes of their own:
`one` is `python fst.py ...` with OMP_NUM_THREADS=2, `ranks` is `torchrun --standalone --nproc_per_node 2
fst.py ...` with OMP_NUM_THREADS=1 per process. Sides alternate (one, ranks, then ranks, one, ...). Each
runs a warm-up step and N timed steps; seconds per step come from `seconds_step` in metrics.jsonl.

Same work? Both sides train on the same problems with the same number of rollouts per step, but rank 1
samples with a seed of its own (the one-process run draws all rows from rank 0's seed), so the tokens
they generate differ. The script prints the per-step ratio only when both sides generated the same
number of tokens within 5%; otherwise it prints seconds per 1000 generated tokens for each side and the
ratio of those, marked as normalised, and no per-step ratio. Ratios < 1: the 2-process side is faster.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAME_TOKENS = 0.05          # sides whose generated tokens differ by less than this did the same work


def run_side(a, side: str, out_dir: Path, name: str) -> dict:
    """One run of `side`; returns its timed steps' seconds and generated tokens (from metrics.jsonl)."""
    args = ["--config", a.config, "--set", "mode=rl", "--set", f"train.steps={a.warmup + a.steps}",
            "--set", "eval.every=0", "--set", f"train.save_every={10 ** 6}", "--set", f"out_dir={out_dir}",
            "--set", f"run_name={name}", *[x for s in a.set for x in ("--set", s)]]
    if side == "one":
        cmd, threads = [sys.executable, str(ROOT / "fst.py"), *args], a.threads
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.procs}",
               str(ROOT / "fst.py"), *args]
        threads = max(1, a.threads // a.procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["kind"] == "train" and r["step"] >= a.warmup]
    rollouts = [r["rollouts_rl"] for r in rows if r["kind"] == "train"]
    per_step = rollouts[0]                                 # B * G: the same every step
    return {"side": side, "threads_per_process": threads, "processes": 1 if side == "one" else a.procs,
            "seconds_step": [r["seconds_step"] for r in timed],
            "tokens": sum(r["completion_len_mean"] * per_step for r in timed), "rollouts_per_step": per_step,
            "wall_seconds": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny.yaml")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="threads in all, per side")
    ap.add_argument("--procs", type=int, default=2, help="processes of the torchrun side")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fst override for both sides")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="data_parallel_"))
    runs = []
    for pair in range(a.pairs):
        for side in (("one", "ranks") if pair % 2 == 0 else ("ranks", "one")):
            r = run_side(a, side, work, f"{side}-{pair}") | {"pair": pair}
            runs.append(r)
            print(f"[bench] pair {pair} {side:>5}: {statistics.median(r['seconds_step']):.2f} s/step, "
                  f"{r['tokens']:.0f} tokens in {len(r['seconds_step'])} timed steps", file=sys.stderr)

    pairs = []
    for pair in range(a.pairs):
        one, ranks = (next(r for r in runs if r["pair"] == pair and r["side"] == s) for s in ("one", "ranks"))
        same = abs(ranks["tokens"] - one["tokens"]) <= SAME_TOKENS * one["tokens"]
        per_k = lambda r: sum(r["seconds_step"]) / r["tokens"] * 1000  # noqa: E731
        pairs.append({"pair": pair, "same_tokens": same,
                      "ratio_per_step": (statistics.median(ranks["seconds_step"]) /
                                         statistics.median(one["seconds_step"])) if same else None,
                      "seconds_per_1k_tokens": {"one": per_k(one), "ranks": per_k(ranks)},
                      "ratio_per_token_normalised": per_k(ranks) / per_k(one)})
    summary = {"settings": vars(a), "runs": runs, "pairs": pairs,
               "ratio_per_step": statistics.median([p["ratio_per_step"] for p in pairs])
               if all(p["same_tokens"] for p in pairs) else None,
               "ratio_per_token_normalised": statistics.median(p["ratio_per_token_normalised"] for p in pairs)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"data_parallel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))

    print(f"\n{'pair':>4} {'side':>5} {'procs x threads':>15} {'s/step (median)':>15} {'tokens':>7} {'s/1k tok':>8}")
    for r in runs:
        p = next(p for p in pairs if p["pair"] == r["pair"])
        print(f"{r['pair']:>4} {r['side']:>5} {r['processes']:>11} x {r['threads_per_process']:<1} "
              f"{statistics.median(r['seconds_step']):>15.2f} {r['tokens']:>7.0f} "
              f"{p['seconds_per_1k_tokens'][r['side']]:>8.2f}")
    for p in pairs:
        if p["same_tokens"]:
            print(f"pair {p['pair']}: same tokens (within {SAME_TOKENS:.0%}); ranks/one per step: "
                  f"{p['ratio_per_step']:.2f}")
        else:
            print(f"pair {p['pair']}: the sides generated different numbers of tokens, so no per-step ratio; "
                  f"seconds per 1k tokens, ranks/one: {p['ratio_per_token_normalised']:.2f} (normalised)")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
