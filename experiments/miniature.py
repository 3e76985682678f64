"""experiments/miniature.py -- FST against RL at CPU scale: the paper's three studies on SmolLM2-135M.

    python experiments/miniature.py --study all --threads 2     # writes results/miniature/
    python experiments/miniature.py --study 1 --seeds 0 1 2 3 4 # adds seeds 2-4; 0 and 1 come from their records
    python experiments/miniature.py --study 1 --report-only     # README, plots, summary.json from the records alone
    python experiments/miniature.py --quick --out /tmp/mini     # the same code on a tiny random model, ~1 min
    python experiments/miniature.py --study 4 --seeds 0 1 2     # study 4 (not in `all`): experiments/study4.py

Study 1, sample efficiency and drift: arms rl, fst and gepa (and fst-reuse on request) on one task, the
same data stream and seeds, validated every EVAL_EVERY steps on fixed held-out problems; accuracy
against RL steps and against all rollouts (RL + fast loop), steps to reach RL's best, exact
KL(trained || base) against accuracy, the 2x2 table {base, trained weights} x {seed, evolved prompt}
at the end of each fst run.
Study 2, continual learning: one run over a schedule of tasks with a task-agnostic seed prompt, rl
against fst, every task validated throughout: accuracy at the end of each stage and forgetting.
Study 3, plasticity: fresh rl on a new task from the base model, from study 1's rl checkpoint and
from study 1's fst checkpoint (init_from), same steps and seeds.
Study 4, where RL cannot start: rl against fst from a start near zero reward, steps to a threshold fixed
before the runs (experiments/study4.py).

How it runs: every arm x seed is one ordinary fst run folder under --runs-dir (scratch: checkpoints,
never committed), started with the arguments a user would type (fst.main, on configs/tiny.yaml plus
--set overrides). A re-invocation skips finished runs and resumes interrupted ones (--resume).
Measurements after training call eval.py (exact KL at every validation checkpoint, the 2x2 table)
and need the checkpoints, so they are made in the run folder; then the run's small record (metrics,
pool files, config, fst's summary, this script's run log and measurements; no weights) is copied to
RESULTS/runs/<run-name>/ with paths relative to the repo. A committed record is a finished run: an
invocation on another machine or a fresh clone uses it as it is and runs only the runs that have no
record (--seeds adds seeds). Tables, plots and summary.json are rebuilt from the records alone
(--report-only does nothing else). Comparisons are paired by seed (same seed = same problems and
validation draws) against the reference arm, with a bootstrap 95% interval of the mean difference;
the verdict follows the interval. Accuracy is the share of samples fully right (reward >= 1), never
the mean reward: the tiny config's 0.1 format credit would show format learning as skill.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study_* modules beside this file
from studies import STUDIES  # noqa: E402
from study_report import PLOTS, _duration, kept_studies, readme  # noqa: E402
import study4  # noqa: E402,F401 -- registers study 4 (its specs, numbers, plot and README section)
from study_runs import (  # noqa: E402
    ALL_ARMS, BASE_CONFIG, DTYPES, ROOT, STUDY1_ARMS, Places, Sizes, _quote, build_tiny_model, check_sizes, cpu_info,
    portable, recorded_arms, recorded_seeds, resolve_dtype, run_cost, runs_to_train)
import fst  # noqa: E402


def choose_runs(args, sizes: Sizes, records_dir: Path, chosen: list[str]):
    """Seeds and study-1 arms: as given; otherwise the defaults plus whatever already has a record (a
    report never silently shrinks), and with --report-only exactly what has a record."""
    recorded = recorded_arms(records_dir, sizes.dtype)
    if args.study1_arms:
        sizes.study1_arms = tuple(args.study1_arms)
    elif args.report_only and recorded:
        sizes.study1_arms = tuple(a for a in ALL_ARMS if a in recorded or a == "rl")
    else:
        sizes.study1_arms = tuple(a for a in ALL_ARMS if a in STUDY1_ARMS or a in recorded)
    if args.study4_arms and not args.report_only:
        sizes.study4_arms = tuple(args.study4_arms)
    for study in chosen:
        have = recorded_seeds(records_dir, study, sizes.dtype)
        if args.seeds:
            seeds = args.seeds
        elif args.report_only and have:
            seeds = have
        else:
            seeds = set(sizes.study_seeds(study)) | have
        sizes.set_study_seeds(study, sorted(set(seeds)))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=["1", "2", "3", "4", "all"], default="all",
                    help="all = 1 2 3; study 4 (a start near zero reward) runs on its own")
    ap.add_argument("--quick", action="store_true", help="tiny random model, a handful of steps (~1 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", "--results-dir", dest="out", type=Path,
                    help="results folder: the records in its runs/, the report (README, plots, summary.json) "
                         "beside them, a bfloat16 report in its bf16/ (default results/miniature, or "
                         "<runs-dir>/results with --quick)")
    ap.add_argument("--runs-dir", type=Path, help="scratch run folders with the checkpoints, never committed "
                                                  "(default runs/miniature, runs/miniature-quick with --quick)")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="seeds of every chosen study (default: 0 1 for studies 1 and 3 and 0 for study 2, "
                         "plus every seed that already has a record; with --report-only the recorded seeds); "
                         "gepa runs on the first")
    ap.add_argument("--study1-arms", nargs="+", choices=list(ALL_ARMS),
                    help="study 1's arms, rl among them (default rl fst gepa plus any arm already recorded; with "
                         "--report-only the recorded arms). fst-reuse = mode fst with fast.reuse=all; the fst-batch "
                         "arms are reported from their records only (study_runs.RECORDED_ONLY)")
    ap.add_argument("--study4-arms", nargs="+", choices=["rl", "fst"],
                    help="study 4: train only these arms (two invocations can share the runs); the report "
                         "is written once every arm x seed has a record")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "bfloat16-fixed"], default="float32",
                    help="model dtype of every run. Default float32: in the paired check (study 1, seed 0, rl and "
                         "fst; results/miniature/bf16/) bf16 ended 0.13-0.15 lower in final accuracy, outside the "
                         "float32 seed spread. auto = bfloat16 where /proc/cpuinfo lists avx512_bf16 or amx_bf16, else "
                         "float32. A bfloat16 run is named ...-bf16 and reported in RESULTS/bf16/. bfloat16-fixed: bf16 "
                         "with eager attention, the float32 head and TIS (study_runs.DTYPE_OVERRIDES), named "
                         "...-bf16fix, reported in RESULTS/bf16fix/")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild README, plots and summary.json from the committed records alone (no training, "
                         "no model); fails naming every missing record")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    runs_dir = (args.runs_dir or ROOT / "runs" / ("miniature-quick" if args.quick else "miniature")).resolve()
    out = (args.out or (runs_dir / "results" if args.quick else ROOT / "results" / "miniature")).resolve()
    dtype = resolve_dtype(args.dtype, cpu_info())
    report_dir = out if dtype == "float32" else out / DTYPES[dtype].lstrip("-")
    chosen = ["1", "2", "3"] if args.study == "all" else [args.study]
    given = sys.argv[1:] if argv is None else argv
    command = "python experiments/miniature.py " + " ".join(_quote(a) for a in given)
    places = Places(runs_dir, out, portable(command, runs_dir, out), args.report_only)
    records_dir = places.records_dir

    # The tiny model's path is part of every quick run's arguments; --report-only only needs its name.
    sizes = Sizes.quick(str(runs_dir / "tiny-model")) if args.quick else Sizes()
    sizes.dtype = dtype
    choose_runs(args, sizes, records_dir, chosen)
    check_sizes(sizes)
    report_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        train_missing(args.quick, sizes, places, chosen)

    summary_file = report_dir / "summary.json"
    model_name = sizes.model or fst.load_config(str(ROOT / BASE_CONFIG)).model.name
    settings = {"quick": args.quick, "model": places.portable(model_name), "base_config": BASE_CONFIG,
                "dtype": dtype, "records": Path(os.path.relpath(records_dir, report_dir)).as_posix(),
                # seeds and arms are per study (each study's entry has its own): the invocation's choice for
                # the studies it did not rebuild would contradict the entries kept from other invocations
                "sizes": {k: v for k, v in vars(sizes).items()
                          if k not in ("model", "extra", "seeds", "study2_seeds", "study3_seeds", "study1_arms")
                          and not k.startswith("study4")}}  # study 4's entry says its own sizes
    base_file = ROOT / "results" / "miniature" / "base_accuracy.json"
    done = {}  # the studies this invocation has rebuilt
    for s in chosen:
        result = STUDIES[s](sizes, places)
        if result is None:  # study 4 with a record missing (another invocation is making it): no report yet
            continue
        done[s] = with_run_totals(result, places, dtype)
        result["plots"] = PLOTS[s](result, report_dir)
        # Re-read before writing: another invocation may have written another study meanwhile.
        summary = {"settings": settings, "studies": kept_studies(summary_file, settings) | done}
        if base_file.exists() and not args.quick:
            summary["base_accuracy"] = json.loads(base_file.read_text())
        summary_file.write_text(places.portable(json.dumps(summary, indent=1)))
        (report_dir / "README.md").write_text(places.portable(readme(summary)))
        print(f"[miniature] study {s}: {len(result['runs'])} records, {_duration(result['wall_seconds'])} of runs "
              f"and measurements; wrote {report_dir}", file=sys.stderr)
        for c in result["comparisons"]:
            print(f"  - {c['text']}", file=sys.stderr)


def train_missing(quick: bool, sizes: Sizes, places: Places, chosen: list[str]):
    """Make the folders, the tiny model with --quick, and say up front how many runs each study will train."""
    places.runs_dir.mkdir(parents=True, exist_ok=True)
    places.records_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        build_tiny_model(places.runs_dir / "tiny-model")
    fast_every = fst.load_config(str(ROOT / BASE_CONFIG), sizes.extra).fast.every
    for s in chosen:
        todo = runs_to_train(s, sizes, places)
        cost = sum(run_cost(spec, sizes, fast_every) for spec in todo)
        print(f"[miniature] study {s}: runs to train: {len(todo)}" + ("" if quick else
              f", expected about {_duration(cost)} on 2 quiet cores") + " (the others have a record or a "
              "finished run folder)", file=sys.stderr)


def with_run_totals(result: dict, places: Places, dtype: str) -> dict:
    """A study's entry plus where its runs were made and how long they took."""
    runs = result["runs"].values()
    train_s = sum(r["seconds_training"] for r in runs)
    measure_s = sum(r["seconds_measuring"] for r in runs)
    machines = [m for r in runs for m in r["machines"]]
    # Time = the seconds of this study's own runs and their measurements, over every invocation and
    # machine that worked on them (a resumed run counts the steps it redid).
    result |= {"report_command": places.command,
               "commands": list(dict.fromkeys(r["recorded_by"] for r in runs if r["recorded_by"])),
               "threads": sorted({m["threads"] for m in machines}),
               "machines": list({json.dumps(m["cpu"], sort_keys=True): m["cpu"] for m in machines}.values()),
               "dtype": dtype, "wall_seconds": round(train_s + measure_s, 1),
               "seconds_training": round(train_s, 1), "seconds_measuring": round(measure_s, 1)}
    return result


if __name__ == "__main__":
    main()
