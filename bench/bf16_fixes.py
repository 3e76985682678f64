"""bench/bf16_fixes.py -- one job: what each bf16 fix costs in time and memory, against plain bf16, side by side.

    python bench/bf16_fixes.py                           # tiny config, 4 steps per setting, 2 rounds
    python bench/bf16_fixes.py --steps 6 --rounds 3 --threads 1

Each setting is a child process `python fst.py --config tiny.yaml --set model.dtype=bfloat16 ...` (mode rl,
no validation), run in turn (baseline, fix 1, fix 2, ..., then again), so a slow moment of the machine
touches every setting alike. Time: the median `seconds_step` of its steps after the first (warm-up), as a
ratio to the baseline's; memory: the child's peak RSS (model load included), as a ratio. Every setting
runs the same steps on the same problems; the sampled tokens differ with the numbers, so the `len` column
(mean completion tokens) says whether the work per step was comparable. Writes bench/out/bf16_fixes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"bf16": [], "fp32_head": ["model.fp32_head=true"], "tis": ["train.tis_cap=2.0"],
            "eager": ["model.attn=eager"], "eager+fp32_head": ["model.attn=eager", "model.fp32_head=true"]}


def run_once(name: str, steps: int, threads: int, out: Path) -> dict:
    sets = ["model.dtype=bfloat16", "device=cpu", "mode=rl", "eval.every=0", f"train.steps={steps}",
            "train.save_every=1000", f"out_dir={out}", f"run_name={name}", *SETTINGS[name]]
    cmd = [sys.executable, "fst.py", "--config", "tiny.yaml"] + [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"[bf16_fixes] {name} failed:\n{proc.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"][1:]  # the first step warms up
    return {"seconds_step": statistics.median(r["seconds_step"] for r in train),
            "len": statistics.mean(r["completion_len_mean"] for r in train),
            "peak_rss_mib": usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "bf16_fixes.json"))
    a = ap.parse_args()
    names = ["bf16"] + [s for s in a.settings if s != "bf16"]
    runs = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="fst-bf16-") as tmp:
        for r in range(a.rounds):
            for n in names:
                runs[n].append(run_once(n, a.steps, a.threads, Path(tmp) / f"round{r}"))
    base = {k: statistics.median(x[k] for x in runs["bf16"]) for k in ("seconds_step", "peak_rss_mib")}
    print("| setting | s/step | time ratio | peak RSS MiB | RSS ratio | len |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for n, xs in runs.items():
        s = {k: statistics.median(x[k] for x in xs) for k in ("seconds_step", "peak_rss_mib", "len")}
        s |= {"time_ratio": s["seconds_step"] / base["seconds_step"], "rss_ratio": s["peak_rss_mib"] / base["peak_rss_mib"]}
        summary[n] = s
        print(f"| {n} | {s['seconds_step']:.2f} | {s['time_ratio']:.2f} | {s['peak_rss_mib']:.0f} | "
              f"{s['rss_ratio']:.2f} | {s['len']:.1f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"settings": SETTINGS, "runs": runs, "summary": summary,
                                       "steps": a.steps, "threads": a.threads}, indent=1))


if __name__ == "__main__":
    main()
