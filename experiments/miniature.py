"""experiments/miniature.py -- FST against RL at CPU scale: the paper's three studies on SmolLM2-135M.

    python experiments/miniature.py --study all --threads 2     # writes results/miniature/
    python experiments/miniature.py --study 1 --seeds 0 1 2 3 4 # adds seeds 2-4; 0 and 1 come from their records
    python experiments/miniature.py --study 1 --report-only     # README, plots, summary.json from the records alone
    python experiments/miniature.py --quick --out /tmp/mini     # the same code on a tiny random model, ~1 min

Study 1, sample efficiency and drift: arms rl, fst and gepa (and fst-reuse on request) on one task, the
same data stream and seeds, validated every EVAL_EVERY steps on fixed held-out problems; accuracy
against RL steps and against all rollouts (RL + fast loop), steps to reach RL's best, exact
KL(trained || base) against accuracy, the 2x2 table {base, trained weights} x {seed, evolved prompt}
at the end of each fst run.
Study 2, continual learning: one run over a schedule of tasks with a task-agnostic seed prompt, rl
against fst, every task validated throughout: accuracy at the end of each stage and forgetting.
Study 3, plasticity: fresh rl on a new task from the base model, from study 1's rl checkpoint and
from study 1's fst checkpoint (init_from), same steps and seeds.

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
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import subprocess
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import context_opt  # noqa: E402
import eval as evaluation  # noqa: E402
import infra  # noqa: E402
import fst  # noqa: E402
import rewards  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Sizes of the real studies (--quick replaces them with QUICK below). Changing one after a study
# has run changes its runs' arguments: the script then refuses to reuse those run folders and records.
BASE_CONFIG = "configs/tiny.yaml"       # SmolLM2-135M, B=2 problems x G=8 rollouts, 64 new tokens
SEEDS = (0, 1)                          # default seeds of studies 1 and 3 (gepa: the first); --seeds
EVAL_EVERY = 6                          # validate (and checkpoint) every N steps; = fast.every, so each
                                        # validation of fst comes right after a fast round
EVAL_N, EVAL_K = 24, 4                  # fixed held-out problems x samples each, the same draws every time
KL_N = 12                               # held-out problems, 1 completion each, for the exact KL per checkpoint
# Tasks the base model gets right 13-25% of the time (results/miniature/base_accuracy.json).
STUDY1_TASK, STUDY1_STEPS = "add", 18
STUDY1_ARMS = ("rl", "fst", "gepa")     # the default arms; --study1-arms picks others (rl always)
STUDY2_SCHEDULE = (("compare", 18), ("word_count", 18))   # stage lengths: multiples of EVAL_EVERY
STUDY2_SEEDS = (0,)
STUDY3_TASK, STUDY3_STEPS = "alphabetical", 24            # a task neither study-1 arm trained on
# What things cost on 2 quiet cores, for the estimate printed up front (seconds).
COST_RL_STEP = 16.0        # one step of the tiny config (issue 9's measurement: median 15.6 s)
COST_GEPA_STEP = 9.0       # sampling + base pass without the update (estimate: ~55% of an RL step)
COST_FAST_ROUND = 150.0    # issue 9's target (< 10 RL steps); 293 s measured before its batched waves
COST_EVAL_SAMPLE = 0.3     # per completion of a validation pass (32 x 4 x 64 tokens: 40 s measured, 1 thread)
COST_KL_PROBLEM = 0.6      # kl_to_base: one completion + two full-vocabulary passes per problem
COST_MODEL_LOAD = 3.0      # infra.load_model for one checkpoint

# Study-1 arms: the fst settings each one adds. fst-reuse trains on every rollout of the fast rounds too
# (fast.reuse=all: with `pool` the first round, whose live pool is the seed prompt alone, gives one
# rollout per problem, which has no advantage, so it would keep nothing).
# fst pins fast.reuse=none: the fast loop as the paper has it, whatever the release default (all, since
# these runs measured it).
ARMS = {"rl": ["mode=rl"], "fst": ["mode=fst", "fast.reuse=none"], "gepa": ["mode=gepa"],
        "fst-reuse": ["mode=fst", "fast.reuse=all"]}
# The dtype is part of a run's name when it is not float32, so fp32 and bf16 records never mix.
DTYPES = {"float32": "", "bfloat16": "-bf16"}
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")  # what decides whether bf16 pays on a CPU
# A record: the run's files that describe it, small and text; never checkpoints or adapter weights.
RECORD_FILES = ("metrics.jsonl", "config.yaml", "summary.json", "miniature_run.json", "miniature_measure.json",
                "eval/*.json", "pool/*.json")
RECORDS = "runs"                        # records live in RESULTS/runs/<run-name>/
# Paired bootstrap: resamples of the seeds and a fixed generator, so a report rebuilt from the same
# records prints the same intervals. Below SMALL_N pairs a percentile interval cannot be wider than
# the differences' range, so a verdict from it is called a sign, not a measurement.
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, SMALL_N = 10_000, 0, 5
REPORT_FORMAT = 2                       # summary.json study entries of another format are not rendered

# --quick: the same code on a 2-layer random Llama built in-process, a handful of steps.
QUICK = dict(SEEDS=(0, 1), EVAL_EVERY=2, EVAL_N=2, EVAL_K=2, KL_N=2, STUDY1_STEPS=4,
             STUDY2_SCHEDULE=(("compare", 2), ("word_count", 2)), STUDY2_SEEDS=(0,), STUDY3_STEPS=2)
QUICK_OVERRIDES = ["sampling.max_new_tokens=8", "sampling.group_size=4", "fast.every=2", "fast.budget=1",
                   "fast.reflector_max_new_tokens=8", "train.lr=0.01"]


@dataclass
class Sizes:
    seeds: tuple = SEEDS                 # study 1 (gepa: the first)
    eval_every: int = EVAL_EVERY
    eval_n: int = EVAL_N
    eval_k: int = EVAL_K
    kl_n: int = KL_N
    study1_steps: int = STUDY1_STEPS
    study1_arms: tuple = STUDY1_ARMS     # --study1-arms: a subset when time is short (said in the README)
    study2_schedule: tuple = STUDY2_SCHEDULE
    study2_seeds: tuple = STUDY2_SEEDS
    study3_steps: int = STUDY3_STEPS
    study3_seeds: tuple = SEEDS
    dtype: str = "float32"               # model.dtype of every run
    model: str = ""                      # "" = the base config's (smollm2-135m)
    extra: list = field(default_factory=list)   # more --set overrides for every run

    @classmethod
    def quick(cls, model_dir: str):
        q = {k.lower(): v for k, v in QUICK.items()}
        return cls(**q, study3_seeds=q["seeds"], model=model_dir, extra=list(QUICK_OVERRIDES))

    def study_seeds(self, study: str) -> tuple:
        return {"1": self.seeds, "2": self.study2_seeds, "3": self.study3_seeds}[study]

    def set_study_seeds(self, study: str, seeds):
        setattr(self, {"1": "seeds", "2": "study2_seeds", "3": "study3_seeds"}[study], tuple(seeds))


def check_sizes(sizes: Sizes):
    """Settings that would make a study measure something else fail here, naming the constant."""
    if any(steps % sizes.eval_every for _, steps in sizes.study2_schedule):
        raise SystemExit(f"STUDY2_SCHEDULE: every stage length must be a multiple of EVAL_EVERY "
                         f"({sizes.eval_every}), so that a validation falls on each stage's end")
    if STUDY3_TASK == STUDY1_TASK:
        raise SystemExit("STUDY3_TASK must differ from STUDY1_TASK: plasticity is measured on a new task")
    for name in {STUDY1_TASK, STUDY3_TASK, *(t for t, _ in sizes.study2_schedule)}:
        if name not in rewards.TASKS:
            raise SystemExit(f"task {name!r} is not registered in rewards.py")
    if "rl" not in sizes.study1_arms:
        raise SystemExit("--study1-arms: rl is needed, every other arm is compared against it")


# ---------------------------------------------------------------------------------------------
# The machine: which dtype pays on this CPU, and what a record says about where it ran.

def code_version() -> str | None:
    """The git commit the run's code came from (+ "-dirty" with uncommitted changes), or None outside git:
    records made on different days say which version of fst made them."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and the flags in CPU_FLAGS, from /proc/cpuinfo (Linux; elsewhere no
    flags are known). `cpuinfo` is that file's text, for tests."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if sys.platform.startswith("linux") and path.exists() else ""
    fields = {}
    for line in cpuinfo.splitlines():  # the first processor's block is enough: the flags are the same
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "platform": sys.platform,
            "flags": {name: name in flags for name in CPU_FLAGS}}


def resolve_dtype(choice: str, cpu: dict) -> str:
    """--dtype auto: bfloat16 where the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16), else float32."""
    if choice != "auto":
        return choice
    return "bfloat16" if cpu["flags"]["avx512_bf16"] or cpu["flags"]["amx_bf16"] else "float32"


def machine() -> dict:
    """What a run log keeps about the machine of each segment."""
    return {"cpu": cpu_info(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Runs: one fst run folder per arm x seed.

@dataclass
class RunSpec:
    study: str
    arm: str                 # rl / fst / gepa / fst-reuse, or study 3's starting point
    seed: int
    steps: int               # total steps, to know when the run is finished
    overrides: list          # --set key=value on top of BASE_CONFIG
    tasks: list              # the tasks it trains on (validated throughout)
    dtype: str = "float32"
    mode: str = "rl"         # fst's mode, for the cost estimate
    two_by_two: bool = False  # measure the 2x2 table at its end (study 1's fst-mode arms)
    start: str = ""          # study 3: the study-1 run whose checkpoint it starts from

    @property
    def name(self) -> str:
        return run_name(self.study, self.arm, self.seed, self.dtype)


def run_name(study: str, arm: str, seed: int, dtype: str = "float32") -> str:
    return f"s{study}-{arm}-seed{seed}{DTYPES[dtype]}"


NAME = re.compile(r"^s(?P<study>\d)-(?P<arm>.+)-seed(?P<seed>\d+)(?P<dtype>-bf16)?$")


def common_overrides(sizes: Sizes, seed: int) -> list[str]:
    out = [f"train.seed={seed}", f"eval.every={sizes.eval_every}", f"train.save_every={sizes.eval_every}",
           f"eval.n={sizes.eval_n}", f"eval.k={sizes.eval_k}", "device=cpu"]
    if sizes.model:
        out.append(f"model.name={sizes.model}")
    # float32 is the base config's dtype: left unsaid, so runs made before --dtype keep their arguments
    return out + sizes.extra + ([] if sizes.dtype == "float32" else [f"model.dtype={sizes.dtype}"])


def study1_specs(sizes: Sizes) -> list[RunSpec]:
    specs = []
    for arm in sizes.study1_arms:
        mode = ARMS[arm][0].removeprefix("mode=")
        for seed in sizes.seeds[:1] if arm == "gepa" else sizes.seeds:
            specs.append(RunSpec("1", arm, seed, sizes.study1_steps, common_overrides(sizes, seed) + ARMS[arm] + [
                f"task.name={STUDY1_TASK}", "task.system_prompt=''", f"train.steps={sizes.study1_steps}"],
                [STUDY1_TASK], sizes.dtype, mode, two_by_two=mode == "fst"))
    return specs


def study2_specs(sizes: Sizes) -> list[RunSpec]:
    stages = ", ".join(f"{{name: {name}, steps: {steps}, options: {{format_reward: 0.1}}}}"
                       for name, steps in sizes.study2_schedule)
    total = sum(steps for _, steps in sizes.study2_schedule)
    return [RunSpec("2", arm, seed, total, common_overrides(sizes, seed) + ARMS[arm] + [
        f"schedule=[{stages}]", "task.system_prompt=''"],  # '' = rewards.TASK_AGNOSTIC_PROMPT
        [name for name, _ in sizes.study2_schedule], sizes.dtype, arm)
        for arm in ("rl", "fst") for seed in sizes.study2_seeds]


def study3_specs(sizes: Sizes, runs_dir: Path) -> list[RunSpec]:
    specs = []
    for start in ("base", "rl", "fst"):
        for seed in sizes.study3_seeds:
            origin = "" if start == "base" else run_name("1", start, seed, sizes.dtype)
            init = [f"init_from={runs_dir / origin}"] if origin else []
            specs.append(RunSpec("3", f"from-{start}", seed, sizes.study3_steps, common_overrides(sizes, seed) + [
                "mode=rl", f"task.name={STUDY3_TASK}", "task.system_prompt=''",
                f"train.steps={sizes.study3_steps}", *init], [STUDY3_TASK], sizes.dtype, start=origin))
    return specs


def portable(text: str, runs_dir: Path, results_dir: Path | None = None) -> str:
    """Committed results name no folder of the machine that made them: run folders are written
    relative to --runs-dir (`<runs-dir>/s1-rl-seed0`), a results folder outside the repo as
    `<results>`, files of the repo relative to it."""
    swaps = {str(Path(runs_dir).resolve()): "<runs-dir>", str(runs_dir): "<runs-dir>"}
    if results_dir is not None and not Path(results_dir).resolve().is_relative_to(ROOT):
        swaps[str(Path(results_dir).resolve())] = "<results>"
    for path in sorted(swaps, key=len, reverse=True):  # the longer first: one folder may hold the other
        text = text.replace(path, swaps[path])
    return text.replace(str(ROOT) + "/", "")


def machine_paths_in(text: str, *folders: Path) -> list[str]:
    """The folders of this machine that portable() should have taken out of `text` (none, or a bug)."""
    home = str(Path.home())
    found = {str(ROOT), home if home != "/" else "", *(str(Path(f).resolve()) for f in folders)}
    return sorted(p for p in found if p and p in text)


def last_step_saved(run_dir: Path) -> int | None:
    ckpt = infra.latest_checkpoint(run_dir)
    return int(ckpt.name.removeprefix("step_")) if ckpt and ckpt.is_dir() else None


def is_finished(spec: RunSpec, runs_dir: Path) -> bool:
    saved = last_step_saved(runs_dir / spec.name)
    return saved is not None and saved >= spec.steps - 1


def ensure_run(spec: RunSpec, runs_dir: Path) -> Path:
    """Start, resume or skip one run. RUN/miniature_run.json (the run log) keeps its fst command and
    the seconds and machine of every invocation (written before fst starts, so a killed session
    still leaves them)."""
    run_dir = runs_dir / spec.name
    argv = ["--config", str(ROOT / BASE_CONFIG), "--set", f"out_dir={runs_dir}", "--set", f"run_name={spec.name}"]
    for item in spec.overrides:
        argv += ["--set", item]
    log = read_run_log(run_dir)
    if log and log["overrides"] != spec.overrides:
        raise SystemExit(f"{run_dir} was started with other settings than this script now asks for "
                         f"(a size constant changed?); delete the folder or use another --runs-dir")
    if is_finished(spec, runs_dir):
        return run_dir
    saved = last_step_saved(run_dir)
    if saved is None or log is None:  # new, or interrupted before its first checkpoint: start afresh
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        log = {"overrides": spec.overrides, "command": "python fst.py " + " ".join(_quote(a) for a in argv),
               "segments": []}
        how, args = "start", argv
    else:
        how, args = f"resume after step {saved}", ["--resume", str(run_dir)]
    print(f"[miniature] {spec.name}: {how} ({spec.steps} steps)", file=sys.stderr)
    segment = {"how": how, "started": time.time(), "seconds": None, "finished": False, "machine": machine(),
               "code": code_version()}
    log["segments"].append(segment)
    write_run_log(run_dir, log)
    t0 = time.perf_counter()
    try:
        fst.main(args)
        segment["finished"] = True
    finally:  # an interrupted segment still counts its time
        segment["seconds"] = round(time.perf_counter() - t0, 1)
        write_run_log(run_dir, log)
        gc.collect()
    return run_dir


def read_run_log(run_dir: Path) -> dict | None:
    """RUN/miniature_run.json; a segment a killed process left without its seconds gets them from
    the last write to metrics.jsonl."""
    path = run_dir / "miniature_run.json"
    if not path.exists():
        return None
    log = json.loads(path.read_text())
    metrics = run_dir / "metrics.jsonl"
    for segment in log["segments"]:
        if segment["seconds"] is None:
            end = metrics.stat().st_mtime if metrics.exists() else segment["started"]
            segment["seconds"] = round(max(0.0, end - segment["started"]), 1)
    return log


def write_run_log(run_dir: Path, log: dict):
    (run_dir / "miniature_run.json").write_text(json.dumps(log, indent=1))


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_./=:," for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------------
# Records: a finished, measured run's small files in RESULTS/runs/<name>/, the only thing the
# tables and plots are made from.

@dataclass
class Places:
    runs_dir: Path           # scratch run folders (checkpoints)
    results_dir: Path        # RESULTS: the records in runs/, the float32 report
    command: str             # this invocation, kept in the records it writes
    report_only: bool = False

    @property
    def records_dir(self) -> Path:
        return self.results_dir / RECORDS

    def portable(self, text: str) -> str:
        return portable(text, self.runs_dir, self.results_dir)


def recorded_seeds(records_dir: Path, study: str, dtype: str) -> set[int]:
    """Seeds that have at least one record of `study` in `dtype`."""
    found = set()
    for path in records_dir.glob(f"s{study}-*") if records_dir.is_dir() else []:
        m = NAME.match(path.name)
        if m and path.is_dir() and (m["dtype"] or "") == DTYPES[dtype]:
            found.add(int(m["seed"]))
    return found


def check_record(spec: RunSpec, record: Path, places: Places):
    """A record made with other arguments (a size constant changed) is never used silently."""
    log = json.loads((record / "miniature_run.json").read_text())
    if log["overrides"] != [places.portable(o) for o in spec.overrides]:
        raise SystemExit(f"{record} was made with other settings than this script now asks for "
                         "(a size constant changed?); remove that record or use another --out")


def commit_record(spec: RunSpec, places: Places) -> Path:
    """Copy the run's record into RESULTS/runs/<name>/ (whole or not at all: written beside it, then
    renamed), every text with portable() paths, and the run log told who recorded it and where."""
    run_dir, record = places.runs_dir / spec.name, places.records_dir / spec.name
    tmp = record.with_name(f".{spec.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for pattern in RECORD_FILES:
        for src in sorted(run_dir.glob(pattern)):
            dst = tmp / src.relative_to(run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = src.read_text()
            if src.name == "miniature_run.json":
                log = read_run_log(run_dir)  # seconds of killed segments filled in
                log |= {"name": spec.name, "study": spec.study, "arm": spec.arm, "seed": spec.seed,
                        "dtype": fst.load_config(str(run_dir / "config.yaml")).model.dtype,
                        "recorded_by": places.command, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "recorded_on": machine(), "start": start_note(spec, places)}
                text = json.dumps(log, indent=1)
            text = places.portable(text)
            leaks = machine_paths_in(text, places.runs_dir, places.results_dir)
            if leaks:
                raise SystemExit(f"{src}: would commit the machine's paths {leaks}; extend portable()")
            dst.write_text(text)
    tmp.rename(record)
    print(f"[miniature] {spec.name}: recorded in {record}", file=sys.stderr)
    return record


def start_note(spec: RunSpec, places: Places) -> dict | None:
    """Study 3 starts from a study-1 checkpoint, which exists only in a run folder. On a machine
    where that run was made again (its record came from elsewhere), say whether the validation
    curve came out the same as recorded: a different one is a different starting point."""
    if not spec.start:
        return None
    record = places.records_dir / spec.start

    def curve(folder):
        return [(r["step"], r["task"], r["accuracy"]) for r in evaluation.val_curve(evaluation.read_metrics(folder))]
    return {"run": spec.start, "same_validation_as_its_record":
            curve(places.runs_dir / spec.start) == curve(record) if record.is_dir() else None}


def obtain(spec: RunSpec, sizes: Sizes, places: Places) -> Path:
    """The record of one run: the committed one, or train (or resume), measure and record it now."""
    record = places.records_dir / spec.name
    if record.is_dir():
        check_record(spec, record, places)
        return record
    if spec.start:  # study 3: the study-1 checkpoint it starts from (its KL at step 0 too)
        starts = study1_specs(dataclasses.replace(sizes, study1_arms=("rl", "fst"), seeds=(spec.seed,)))
        ensure_run(next(s for s in starts if s.name == spec.start), places.runs_dir)
    run_dir = ensure_run(spec, places.runs_dir)
    measure_kl(run_dir, spec.tasks, sizes.kl_n)
    if spec.two_by_two:
        measure_two_by_two(run_dir, spec.tasks[0])
    return commit_record(spec, places)


def gather(specs: list[RunSpec], sizes: Sizes, places: Places) -> dict[str, Path]:
    """{run name: record}. --report-only: every record must be there already; the error names
    the missing ones all at once."""
    if places.report_only:
        missing = [s.name for s in specs if not (places.records_dir / s.name).is_dir()]
        if missing:
            raise SystemExit(f"--report-only: no record for {', '.join(missing)} in "
                             f"{places.records_dir}; run the study without "
                             "--report-only to make them, or choose --seeds / --study1-arms that have records")
    return {s.name: obtain(s, sizes, places) for s in specs}


# ---------------------------------------------------------------------------------------------
# Measurements after training, cached in RUN/miniature_measure.json.

def _cache(run_dir: Path) -> dict:
    path = run_dir / "miniature_measure.json"
    return json.loads(path.read_text()) if path.exists() else {"kl": {}, "seconds": 0.0}


def _save_cache(run_dir: Path, cache: dict):
    (run_dir / "miniature_measure.json").write_text(json.dumps(cache, indent=1))


def eval_steps(run_dir: Path) -> list[int]:
    return sorted({r["step"] for r in evaluation.read_metrics(run_dir) if r.get("kind") == "eval"})


def measure_kl(run_dir: Path, tasks: list[str], kl_n: int) -> dict:
    """{eval step: {task: exact KL(trained || base) per token}} with the prompt deployed at that
    checkpoint (its pool's best context: the seed prompt for rl), from eval.kl_to_base. Step 0 is the weights
    the run started from: the base model (LoRA B = 0, KL 0 exactly) or, with init_from, that
    checkpoint under the run's own seed prompt. gepa never updates the weights: 0 throughout."""
    cfg = fst.load_config(str(run_dir / "config.yaml"))
    cache = _cache(run_dir)
    todo = [s for s in eval_steps(run_dir) if str(s) not in cache["kl"]]
    t0 = time.perf_counter()
    made = {}
    for step in todo:
        if cfg.mode == "gepa" or (step == 0 and not cfg.init_from):
            cache["kl"][str(step)] = {t: 0.0 for t in tasks}
            continue
        if step == 0:
            ckpt, prompt = infra.find_checkpoint(cfg.init_from), None  # None: the run's seed prompt
        else:
            ckpt = run_dir / "checkpoints" / f"step_{step - 1:06d}"  # eval step s = the weights after s updates
            if not ckpt.is_dir():
                raise SystemExit(f"{ckpt} missing: validation at step {step} has no checkpoint "
                                 "(train.save_every must equal eval.every)")
            prompt = context_opt.best_context(ckpt)
        model, tok = infra.load_model(cfg.model, torch.device("cpu"), adapter_path=str(ckpt))
        kl = {}
        for name in tasks:
            task = made.setdefault(name, evaluation.make_task(name, cfg))
            seed_prompt = rewards.seed_prompt(task, cfg.task.system_prompt, continual=bool(cfg.schedule))
            kl[name] = evaluation.kl_to_base(
                model, tok, task, task.load("test")[:kl_n], prompt or seed_prompt, n_samples=1,
                max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                top_p=cfg.sampling.top_p, chunk_size=cfg.train.logprob_chunk,
                generator=torch.Generator().manual_seed(0))
        cache["kl"][str(step)] = kl
        del model
    if todo:
        cache["seconds"] += time.perf_counter() - t0
        _save_cache(run_dir, cache)
    return {int(s): v for s, v in cache["kl"].items()}


def measure_two_by_two(run_dir: Path, task_name: str) -> dict:
    """eval.two_by_two at the end of a run: {base, trained weights} x {seed, evolved prompt}.
    Three cells are validation rows already logged on the same problems with the same sampling seed
    (base + seed = step 0; trained + seed and trained + best = the last step); the fourth, base
    weights with the evolved prompt, is measured here with eval.evaluate, adapter off."""
    cache = _cache(run_dir)
    if "two_by_two" not in cache:
        t0 = time.perf_counter()
        cfg = fst.load_config(str(run_dir / "config.yaml"))
        ckpt = infra.latest_checkpoint(run_dir)
        rows = [r for r in evaluation.read_metrics(run_dir) if r.get("kind") == "eval" and r["task"] == task_name]
        last = max(r["step"] for r in rows)
        logged = {(r["step"], r["prompt"]): r for r in rows}
        model, tok = infra.load_model(cfg.model, torch.device("cpu"), adapter_path=str(ckpt))
        task = evaluation.make_task(task_name, cfg)
        evolved = context_opt.best_context(ckpt)
        base_evolved = evaluation.evaluate(
            model, tok, task, task.load("test")[:cfg.eval.n], evolved, k=cfg.eval.k, use_adapter=False,
            max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p, generator=torch.Generator().manual_seed(cfg.train.seed + 12345))  # = validation's
        cells = {("base", "seed"): logged[0, "seed"], ("trained", "seed"): logged[last, "seed"],
                 ("trained", "evolved"): logged[last, "best"], ("base", "evolved"): base_evolved}
        cache["two_by_two"] = {"step": last, "evolved_prompt": evolved.text(), "evolved_demos": len(evolved.demos),
                               "accuracy": evaluation.two_by_two(lambda w, p: cells[w, p]["accuracy"]),
                               "mean_reward": evaluation.two_by_two(lambda w, p: cells[w, p]["mean_at_k"]),
                               "pass_at_k": evaluation.two_by_two(lambda w, p: cells[w, p]["pass_at_k"])}
        cache["seconds"] += time.perf_counter() - t0
        _save_cache(run_dir, cache)
    return cache["two_by_two"]


# ---------------------------------------------------------------------------------------------
# Curves and the numbers read off them, from a record.

def run_curves(record: Path, tasks: list[str]) -> dict:
    """{task: [{step, accuracy, mean_reward, pass_at_k, rollouts_rl, rollouts_all, accuracy_seed_prompt, kl}]}
    for the policy as deployed (prompt "best" in fst/gepa, "seed" in rl)."""
    rows = evaluation.read_metrics(record)
    kl = {int(s): v for s, v in _cache(record)["kl"].items()}
    out = {}
    for name in tasks:
        seed_rows = {r["step"]: r for r in rows if r.get("kind") == "eval" and r["task"] == name
                     and r["prompt"] == "seed"}
        out[name] = [{"step": r["step"], "accuracy": r["accuracy"], "mean_reward": r["mean_at_k"],
                      "pass_at_k": r["pass_at_k"], "rollouts_rl": r["rollouts_rl"],
                      "rollouts_all": r["rollouts_rl"] + r["rollouts_fast"],
                      "accuracy_seed_prompt": seed_rows.get(r["step"], {}).get("accuracy"),
                      "kl": kl.get(r["step"], {}).get(name)}
                     for r in evaluation.val_curve(rows, name)]
    return out


def fast_loop_summary(record: Path) -> dict:
    """What a run's fast rounds did, from its record: proposals and acceptances by operator, the reflect
    operator's rejections by reason, and the reflect children that reached a pool file (instruction text)."""
    fast = [r for r in evaluation.read_metrics(record) if r.get("kind") == "fast"]
    total = lambda key: {op: sum(r[key].get(op, 0) for r in fast) for op in fast[0][key]} if fast else {}  # noqa: E731
    reasons = {}
    for r in fast:
        for reason, n in r["rejected_by_operator"].get("reflect", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
    children = {}
    for pool_file in sorted((record / "pool").glob("step_*.json")):
        for p in json.loads(pool_file.read_text())["prompts"]:
            if p.get("operator") == "reflect":
                children.setdefault(p["id"], {"born": p.get("born_step"), "instruction": p["text"]})
    return {"rounds": len(fast), "proposals": total("proposals_by_operator"),
            "accepted": total("accepted_by_operator"), "reflect_rejected": reasons,
            "reflect_children": list(children.values())}


def run_summary(spec: RunSpec, record: Path) -> dict:
    log = json.loads((record / "miniature_run.json").read_text())
    cache = _cache(record)
    train = [r for r in evaluation.read_metrics(record) if r.get("kind", "train") == "train"]
    last = train[-1] if train else {}
    out = {"record": f"{RECORDS}/{spec.name}", "arm": spec.arm, "seed": spec.seed, "steps": spec.steps,
           "dtype": log.get("dtype"), "command": log["command"], "recorded_by": log.get("recorded_by"),
           "machines": [s["machine"] for s in log["segments"] if s.get("machine")],
           "start": log.get("start"), "curves": run_curves(record, spec.tasks),
           "seconds_training": round(sum(s["seconds"] for s in log["segments"]), 1),
           "seconds_measuring": round(cache["seconds"], 1),
           "rollouts_rl": last.get("rollouts_rl", 0), "rollouts_fast": last.get("rollouts_fast", 0),
           "reflector_calls": last.get("reflector_calls", 0)}
    if spec.two_by_two:
        out["two_by_two"] = cache["two_by_two"]
    if spec.arm != "rl" and spec.study == "1":
        out["fast_loop"] = fast_loop_summary(record)
    return out


def mean_curve(curves: list[list[dict]], key: str = "accuracy") -> list[dict]:
    """Pointwise mean over seeds at the steps every seed has."""
    steps = sorted(set.intersection(*(set(p["step"] for p in c) for c in curves))) if curves else []
    out = []
    for s in steps:
        pts = [next(p for p in c if p["step"] == s) for c in curves]
        out.append({"step": s, **{k: _mean([p[k] for p in pts]) for k in (key, "kl", "rollouts_all", "rollouts_rl")}})
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def first_reach(curve: list[dict], target: float, x: str = "step"):
    """x at the first validation point with accuracy >= target (None if never)."""
    return next((p[x] for p in curve if p["accuracy"] >= target - 1e-12), None)


def kl_at_accuracy(curve: list[dict], level: float):
    """KL when the curve first reaches `level`, linearly interpolated between the validation point
    before the crossing and the first one at or above it. None if it never gets there."""
    for before, after in zip(curve, curve[1:]):
        if before["accuracy"] >= level:
            return before["kl"]
        if after["accuracy"] >= level and None not in (before["kl"], after["kl"]):
            frac = (level - before["accuracy"]) / (after["accuracy"] - before["accuracy"])
            return before["kl"] + frac * (after["kl"] - before["kl"])
    return curve[0]["kl"] if curve and curve[0]["accuracy"] >= level else None


def seed_matched_levels(per_arm: dict, curves: dict, arm: str, ref: str = "rl") -> dict:
    """{seed: the highest validation accuracy both `arm`'s and `ref`'s curves of that seed reach}, for the
    seeds both arms have: a level each seed reaches by construction, unlike rl's best mean."""
    ref_best = {seed: max(p["accuracy"] for p in c) for seed, c in zip(per_arm[ref]["seeds"], curves[ref])}
    return {seed: min(max(p["accuracy"] for p in c), ref_best[seed])
            for seed, c in zip(per_arm[arm]["seeds"], curves[arm]) if seed in ref_best}


# ---------------------------------------------------------------------------------------------
# Statistics: spread over seeds, and paired differences with a bootstrap interval.

def describe(values: list) -> dict:
    """Mean and sample standard deviation over seeds (sd None with one value); `missing` counts the
    seeds without a value (a threshold never reached)."""
    ok = [v for v in values if v is not None]
    return {"mean": statistics.fmean(ok) if ok else None, "sd": statistics.stdev(ok) if len(ok) >= 2 else None,
            "n": len(ok), "missing": len(values) - len(ok)}


def paired_bootstrap(diffs, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple | None:
    """95% percentile interval of the mean of `diffs` (one per seed), resampling the seeds with
    replacement `n` times with a fixed generator; None with fewer than two seeds (no spread to
    resample)."""
    d = np.asarray(list(diffs), dtype=float)
    if d.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    # A resampled mean lies within the differences' range; clipping keeps rounding from leaving it
    # (equal differences give exactly that value).
    return float(max(lo, d.min())), float(min(hi, d.max()))


def compare(what: str, arm: str, arm_values: dict, ref: str, ref_values: dict, *, better: str = "higher",
            fmt: str = "{:.3f}") -> dict:
    """`arm` against `ref` on one number, paired by seed ({seed: value}; None = never got there).
    The verdict follows the bootstrap interval of the mean paired difference: it contains 0 -> no
    difference at this scale; above or below 0 -> `arm` ahead or behind, by the direction in `better`.
    Returns the numbers and one sentence (`text`)."""
    signed = fmt.replace("{:", "{:+", 1)
    out = {"what": what, "arm": arm, "against": ref, "better": better, "fmt": fmt, "seeds": [], "diffs": [],
           "mean_diff": None, "ci95": None, "verdict": None}
    a_stats, r_stats = describe(list(arm_values.values())), describe(list(ref_values.values()))
    head = (f"{what} ({better} is better): {arm} {_ms(a_stats, fmt)} vs {ref} {_ms(r_stats, fmt)} "
            f"(mean ± sd over {len(arm_values)} and {len(ref_values)} seeds)")
    never = [f"{s['missing']} of {len(vals)} {name} seeds never got there"
             for name, vals, s in ((arm, arm_values, a_stats), (ref, ref_values, r_stats)) if s["missing"]]
    common = sorted(set(arm_values) & set(ref_values))
    if never or not common:
        # a seed without a value has no difference; leaving it out would flatter that arm
        out["verdict"] = "not comparable"
        why = "; ".join(never) if never else "no seed in common"
        out["text"] = f"{what}: {arm} {_vals(arm_values, fmt)} vs {ref} {_vals(ref_values, fmt)}; {why}, so no " \
                      "difference is computed."
        return out
    diffs = [arm_values[s] - ref_values[s] for s in common]
    ci = paired_bootstrap(diffs)
    mean_diff = statistics.fmean(diffs)
    out |= {"seeds": common, "diffs": diffs, "mean_diff": mean_diff, "ci95": list(ci) if ci else None}
    paired = f"; paired by seed, {arm} - {ref} = {signed.format(mean_diff)}"
    if ci is None:
        out["verdict"] = "n/a (one seed)"
        out["text"] = head + paired + f" on seed {common[0]}; 95% interval n/a (one seed), so no difference " \
                                      "can be called."
        return out
    lo, hi = ci
    if lo <= 0 <= hi:
        out["verdict"] = "no difference at this scale"
    else:
        ahead = (lo > 0) == (better == "higher")
        out["verdict"] = f"{arm} {'ahead' if ahead else 'behind'}"
        if len(common) < SMALL_N:
            out["verdict"] += f" (a sign: {len(common)} seeds)"
    out["text"] = head + paired + (f", 95% bootstrap interval [{signed.format(lo)}, {signed.format(hi)}] over "
                                   f"{len(common)} seeds: {out['verdict']}.")
    return out


def by_seed(per_arm: dict, arm: str, key: str) -> dict:
    """{seed: value} of one per-arm list (the lists are in the order of per_arm[arm]['seeds'])."""
    return dict(zip(per_arm[arm]["seeds"], per_arm[arm][key]))


def _ms(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "n/a"
    sd = fmt.replace("{:+", "{:")  # a spread has no sign, even beside a signed mean
    return fmt.format(stats["mean"]) + (f" ± {sd.format(stats['sd'])}" if stats["sd"] is not None else "")


def _vals(values: dict, fmt: str) -> str:
    return ", ".join(_f(v, fmt) for v in values.values())


# ---------------------------------------------------------------------------------------------
# The studies: records of their runs (made now where missing), then the numbers.

def study1(sizes: Sizes, places: Places) -> dict:
    specs = study1_specs(sizes)
    records = gather(specs, sizes, places)
    runs = {s.name: run_summary(s, records[s.name]) for s in specs}
    task, arms = STUDY1_TASK, list(sizes.study1_arms)
    by_arm = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in arms}
    curves = {arm: [r["curves"][task] for r in rs] for arm, rs in by_arm.items()}
    means = {arm: mean_curve(c) for arm, c in curves.items()}
    target = max(p["accuracy"] for p in means["rl"])
    reach = {arm: {"step": first_reach(means[arm], target),
                   "rollouts_all": first_reach(means[arm], target, "rollouts_all")} for arm in arms}
    for arm in arms:
        s, rl_step = reach[arm]["step"], reach["rl"]["step"]
        reach[arm]["rl_steps_over_these"] = rl_step / s if s and rl_step is not None else None
    per_arm = {arm: {"seeds": [r["seed"] for r in rs],
                     "final_accuracy": [c[-1]["accuracy"] for c in curves[arm]],
                     "best_accuracy": [max(p["accuracy"] for p in c) for c in curves[arm]],
                     # the mean over the validations after step 0: sample efficiency in one number
                     "mean_accuracy_during_training": [_mean([p["accuracy"] for p in c[1:]]) for c in curves[arm]],
                     "steps_to_rl_best": [first_reach(c, target) for c in curves[arm]],
                     "final_kl": [c[-1]["kl"] for c in curves[arm]],
                     "seconds_training": [r["seconds_training"] for r in rs],
                     "seconds_measuring": [r["seconds_measuring"] for r in rs],
                     "rollouts_rl": [r["rollouts_rl"] for r in rs],
                     "rollouts_fast": [r["rollouts_fast"] for r in rs]}
               for arm, rs in by_arm.items()}
    # Matched accuracy, per arm that trains weights: the highest accuracy both its and rl's mean curves reach.
    matched = {}
    for arm in (a for a in arms if a not in ("rl", "gepa")):
        level = min(target, max(p["accuracy"] for p in means[arm]))
        kl_mean = {a: kl_at_accuracy(means[a], level) for a in (arm, "rl")}
        matched[arm] = {"accuracy": level, "kl_mean_curve": kl_mean,
                        "kl_per_seed": {a: [kl_at_accuracy(c, level) for c in curves[a]] for a in (arm, "rl")},
                        "kl_fraction_of_rl": kl_mean[arm] / kl_mean["rl"]
                        if kl_mean[arm] is not None and kl_mean["rl"] else None}
    metrics = ("final_accuracy", "best_accuracy", "mean_accuracy_during_training", "steps_to_rl_best", "final_kl")
    out = {
        "format": REPORT_FORMAT, "task": task, "steps": sizes.study1_steps, "seeds": list(sizes.seeds),
        "arms": arms, "eval_every": sizes.eval_every, "eval_n": sizes.eval_n, "eval_k": sizes.eval_k,
        "kl_n": sizes.kl_n, "runs": runs, "mean_curves": means, "rl_best_mean_accuracy": target,
        "steps_to_rl_best": reach, "matched": matched, "per_arm": per_arm,
        "per_arm_stats": {arm: {k: describe(per_arm[arm][k]) for k in metrics} for arm in arms},
        "two_by_two_accuracy_mean": {arm: {w: {p: _mean([r["two_by_two"]["accuracy"][w][p] for r in rs])
                                               for p in evaluation.PROMPTS} for w in evaluation.WEIGHTS}
                                     for arm, rs in by_arm.items() if rs and "two_by_two" in rs[0]},
    }
    comparisons = []
    for arm in (a for a in arms if a != "rl"):
        def vs_rl(what, key, **kw):
            comparisons.append(compare(what, arm, by_seed(per_arm, arm, key), "rl", by_seed(per_arm, "rl", key),
                                       **kw))
        vs_rl("final validation accuracy", "final_accuracy")
        vs_rl("best validation accuracy", "best_accuracy")
        vs_rl("mean validation accuracy over training (after step 0)", "mean_accuracy_during_training")
        vs_rl(f"steps to reach rl's best mean accuracy {target:.3f}", "steps_to_rl_best", better="lower",
              fmt="{:.1f}")
        # The same questions per seed, at the seed's own matched accuracy (the highest both its curve and
        # rl's curve of that seed reach), so every seed has a value and every seed counts.
        levels = seed_matched_levels(per_arm, curves, arm)
        out.setdefault("seed_matched_accuracy", {})[arm] = levels
        def at_level(a, fn):  # noqa: E306 -- {seed: fn(curve of arm a in that seed, the seed's level)}
            return {seed: fn(c, levels[seed]) for seed, c in zip(per_arm[a]["seeds"], curves[a]) if seed in levels}
        for axis, what in (("step", "RL steps"), ("rollouts_all", "all rollouts (RL + fast)")):
            reach_at = lambda c, level, x=axis: first_reach(c, level, x)  # noqa: E731
            comparisons.append(compare(f"{what} to the seed's matched accuracy", arm, at_level(arm, reach_at),
                                       "rl", at_level("rl", reach_at), better="lower", fmt="{:.1f}"))
        if arm in matched:  # gepa never moves the weights: its KL is 0 by construction, nothing to compare
            comparisons.append(compare("KL at the seed's matched accuracy", arm, at_level(arm, kl_at_accuracy),
                                       "rl", at_level("rl", kl_at_accuracy), better="lower", fmt="{:.5f}"))
            m = matched[arm]
            comparisons.append(compare(
                f"KL at matched accuracy {m['accuracy']:.3f}", arm,
                dict(zip(per_arm[arm]["seeds"], m["kl_per_seed"][arm])), "rl",
                dict(zip(per_arm["rl"]["seeds"], m["kl_per_seed"]["rl"])), better="lower", fmt="{:.5f}"))
            vs_rl("final KL(trained || base)", "final_kl", better="lower", fmt="{:.5f}")
    if {"fst", "fst-reuse"} <= set(arms):  # does training on the fast rounds' rollouts pay? (fast.reuse)
        levels = seed_matched_levels(per_arm, curves, "fst-reuse", ref="fst")
        reach_at = {a: {seed: first_reach(c, levels[seed], "rollouts_all")
                        for seed, c in zip(per_arm[a]["seeds"], curves[a]) if seed in levels} for a in ("fst", "fst-reuse")}
        comparisons.append(compare("all rollouts (RL + fast) to the accuracy both reach in the seed", "fst-reuse",
                                   reach_at["fst-reuse"], "fst", reach_at["fst"], better="lower", fmt="{:.1f}"))
        for what, key in (("final validation accuracy", "final_accuracy"),
                          ("mean validation accuracy over training (after step 0)", "mean_accuracy_during_training")):
            comparisons.append(compare(what, "fst-reuse", by_seed(per_arm, "fst-reuse", key), "fst",
                                       by_seed(per_arm, "fst", key)))
    out["comparisons"] = comparisons
    out["findings"] = [c["text"] for c in comparisons]
    if sizes.dtype != "float32":  # a bf16 run must end where its float32 twin does before bf16 is trusted
        finals = {arm: {seed: {"final_accuracy": a, "final_kl": k} for seed, a, k in
                        zip(per_arm[arm]["seeds"], per_arm[arm]["final_accuracy"], per_arm[arm]["final_kl"])}
                  for arm in arms}
        out["against_float32"] = against_float32(finals, float32_finals(sizes, places))
    out["fast_loop"] = {arm: fast_loop_totals(rs) for arm, rs in by_arm.items() if rs and "fast_loop" in rs[0]}
    return out


def float32_finals(sizes: Sizes, places: Places) -> dict:
    """{arm: {seed: {final_accuracy, final_kl}}} of every float32 study-1 record of `sizes`' arms."""
    fp32 = dataclasses.replace(sizes, dtype="float32",
                               seeds=tuple(sorted(recorded_seeds(places.records_dir, "1", "float32"))))
    out = {}
    for spec in study1_specs(fp32):
        record = places.records_dir / spec.name
        if record.is_dir():
            last = run_curves(record, spec.tasks)[spec.tasks[0]][-1]
            out.setdefault(spec.arm, {})[spec.seed] = {"final_accuracy": last["accuracy"], "final_kl": last["kl"]}
    return out


def against_float32(bf16: dict, fp32: dict) -> list[dict]:
    """The check before a study switches to bfloat16: each bf16 run beside its float32 twin (same arm
    and seed, so the same problems and validation draws), and whether the difference lies within the
    float32 seed spread of that arm (one sample standard deviation over its seeds; None with one seed).
    Both arguments: {arm: {seed: {"final_accuracy": x, "final_kl": y}}}; runs without a twin are left out."""
    rows = []
    for arm, seeds in bf16.items():
        for seed, b in sorted(seeds.items()):
            f = fp32.get(arm, {}).get(seed)
            if f is None:
                continue
            row = {"arm": arm, "seed": seed}
            for key in ("final_accuracy", "final_kl"):
                sd = describe([r[key] for r in fp32[arm].values()])["sd"]
                diff = None if None in (b[key], f[key]) else b[key] - f[key]
                row[key] = {"float32": f[key], "bfloat16": b[key], "diff": diff, "float32_seed_sd": sd,
                            "within_spread": None if diff is None or sd is None else abs(diff) <= sd}
            rows.append(row)
    return rows


def fast_loop_totals(runs: list[dict]) -> dict:
    """An arm's fast loop over its seeds: sums by operator; the reflect guard's pass rate (replies that
    no guard rejected, whatever their minibatch test then said); the reflect children, with their seed."""
    add = lambda key: {op: sum(r["fast_loop"][key].get(op, 0) for r in runs)  # noqa: E731
                       for op in dict.fromkeys(op for r in runs for op in r["fast_loop"][key])}
    proposals, accepted, rejected = add("proposals"), add("accepted"), add("reflect_rejected")
    replies = proposals.get("reflect", 0)
    guarded = sum(n for reason, n in rejected.items() if reason != "not_better")
    return {"rounds": sum(r["fast_loop"]["rounds"] for r in runs), "proposals": proposals, "accepted": accepted,
            "reflect_rejected": rejected, "reflect_replies": replies,
            "reflect_guard_pass_rate": (replies - guarded) / replies if replies else None,
            "reflect_children": [dict(c, seed=r["seed"]) for r in runs for c in r["fast_loop"]["reflect_children"]]}


def study2(sizes: Sizes, places: Places) -> dict:
    specs = study2_specs(sizes)
    records = gather(specs, sizes, places)
    runs = {s.name: run_summary(s, records[s.name]) for s in specs}
    tasks = [name for name, _ in sizes.study2_schedule]
    ends, total = [], 0
    for name, steps in sizes.study2_schedule:
        total += steps
        ends.append((name, total))
    last = ends[-1][0]
    for r in runs.values():  # accuracy of every task at the end of every stage (eval steps = stage ends)
        r["at_stage_end"] = {stage: {t: _at(r["curves"][t], step) for t in tasks} for stage, step in ends}
        r["kl_at_stage_end"] = {stage: _mean([_at(r["curves"][t], step, "kl") for t in tasks])
                                for stage, step in ends}
        r["forgetting"] = {t: _minus(r["at_stage_end"][t][t], r["at_stage_end"][last][t]) for t in tasks[:-1]}
    arms = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in ("rl", "fst")}

    def values(arm, get):
        return {r["seed"]: get(r) for r in arms[arm]}
    numbers = [(f"accuracy on {stage} at the end of its stage", lambda r, st=stage: r["at_stage_end"][st][st],
                "higher", "{:.3f}") for stage, _ in ends]
    numbers += [(f"forgetting of {stage} by the end (accuracy at its stage end minus at the end)",
                 lambda r, st=stage: r["forgetting"][st], "lower", "{:.3f}") for stage, _ in ends[:-1]]
    numbers += [(f"accuracy on {t} at the end", lambda r, t=t: r["at_stage_end"][last][t], "higher", "{:.3f}")
                for t in tasks[:-1]]
    numbers.append(("KL(trained || base) at the end, mean over tasks", lambda r: r["kl_at_stage_end"][last], "lower",
                    "{:.5f}"))
    comparisons = [compare(what, "fst", values("fst", get), "rl", values("rl", get), better=better, fmt=fmt)
                   for what, get, better, fmt in numbers]
    per_arm_stats = {arm: {what: describe(list(values(arm, get).values())) for what, get, _, _ in numbers}
                     for arm in arms}
    mean_curves = {arm: {t: mean_curve([r["curves"][t] for r in rs]) for t in tasks} for arm, rs in arms.items()}
    return {"format": REPORT_FORMAT, "schedule": [list(s) for s in sizes.study2_schedule],
            "seeds": list(sizes.study2_seeds), "seed_prompt": rewards.TASK_AGNOSTIC_PROMPT,
            "eval_every": sizes.eval_every, "eval_n": sizes.eval_n, "eval_k": sizes.eval_k, "kl_n": sizes.kl_n,
            "stage_ends": ends, "runs": runs, "mean_curves": mean_curves, "per_arm_stats": per_arm_stats,
            "comparisons": comparisons, "findings": [c["text"] for c in comparisons]}


def study3(sizes: Sizes, places: Places) -> dict:
    specs = study3_specs(sizes, places.runs_dir)
    records = gather(specs, sizes, places)
    runs = {s.name: run_summary(s, records[s.name]) for s in specs}
    task = STUDY3_TASK
    arms = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in ("from-base", "from-rl", "from-fst")}
    curves = {arm: [r["curves"][task] for r in rs] for arm, rs in arms.items()}
    per_arm = {arm: {"seeds": [r["seed"] for r in rs],
                     "start_accuracy": [c[0]["accuracy"] for c in curves[arm]],
                     "final_accuracy": [c[-1]["accuracy"] for c in curves[arm]],
                     "gain": [c[-1]["accuracy"] - c[0]["accuracy"] for c in curves[arm]],
                     "final_kl": [c[-1]["kl"] for c in curves[arm]]} for arm, rs in arms.items()}
    comparisons = []
    for arm, ref in (("from-rl", "from-base"), ("from-fst", "from-base"), ("from-fst", "from-rl")):
        for what, key in ((f"final accuracy on {task}", "final_accuracy"),
                          (f"gain on {task} (final minus start)", "gain")):
            comparisons.append(compare(what, arm, by_seed(per_arm, arm, key), ref, by_seed(per_arm, ref, key)))
    # A start checkpoint made again on this machine whose validation differs from study 1's record
    # is another starting point than the one study 1 reports: said, not hidden.
    restarted = [r["start"]["run"] for r in runs.values()
                 if r.get("start") and r["start"]["same_validation_as_its_record"] is False]
    return {"format": REPORT_FORMAT, "task": task, "steps": sizes.study3_steps, "seeds": list(sizes.study3_seeds),
            "eval_every": sizes.eval_every, "eval_n": sizes.eval_n, "eval_k": sizes.eval_k,
            "starts_from": {f"from-{a}": f"s1-{a}-seed<seed>{DTYPES[sizes.dtype]}" for a in ("rl", "fst")},
            "starts_not_as_recorded": sorted(set(restarted)),
            "runs": runs, "mean_curves": {arm: mean_curve(c) for arm, c in curves.items()}, "per_arm": per_arm,
            "per_arm_stats": {arm: {k: describe(v) for k, v in p.items() if k != "seeds"}
                              for arm, p in per_arm.items()},
            "comparisons": comparisons, "findings": [c["text"] for c in comparisons]}


def _at_seed(curve, step):
    return _at(curve, step, "accuracy_seed_prompt")


def _at(curve, step, key="accuracy"):
    return next((p[key] for p in curve if p["step"] == step), None)


def _minus(a, b):
    return None if a is None or b is None else a - b


# ---------------------------------------------------------------------------------------------
# Plots and the README: thin lines are seeds, thick lines their mean.

COLOURS = {"rl": "tab:blue", "fst": "tab:red", "gepa": "tab:green", "fst-reuse": "tab:purple",
           "from-base": "tab:grey", "from-rl": "tab:blue", "from-fst": "tab:red"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_study1(s: dict, out: Path) -> list[str]:
    plt = _pyplot()
    task = s["task"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, x, label in ((axes[0], "step", "RL steps"), (axes[1], "rollouts_all", "all rollouts (RL + fast loop)")):
        for arm in s["arms"]:
            colour, seeds = COLOURS[arm], [r for r in s["runs"].values() if r["arm"] == arm]
            for r in seeds:
                c = r["curves"][task]
                ax.plot([p[x] for p in c], [p["accuracy"] for p in c], color=colour, lw=0.8, alpha=0.45)
            m = s["mean_curves"][arm]
            ax.plot([p[x] for p in m], [p["accuracy"] for p in m], color=colour, lw=2.2, marker="o", ms=4,
                    label=f"{arm} (mean of {len(seeds)})")
            if arm != "rl" and x == "step":  # the same weights with the seed prompt: what the evolved prompt adds
                seed_prompt = [_mean([_at_seed(r["curves"][task], p["step"]) for r in seeds]) for p in m]
                ax.plot([p["step"] for p in m], seed_prompt, color=colour, lw=1.2, ls="--",
                        label=f"{arm}, seed prompt instead of the evolved one")
        ax.axhline(s["rl_best_mean_accuracy"], color="grey", ls="--", lw=1, label="rl's best mean")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation accuracy ({task}, reward = 1)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Study 1: accuracy on fixed held-out problems; thin lines are seeds, thick their mean")
    files = [_save(fig, out / "study1_accuracy.png")]

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm in s["arms"]:
        for r in (r for r in s["runs"].values() if r["arm"] == arm):
            c = r["curves"][task]
            ax.plot([p["accuracy"] for p in c], [p["kl"] for p in c], color=COLOURS[arm], lw=0.8, alpha=0.45,
                    marker=".")
        m = s["mean_curves"][arm]
        ax.plot([p["accuracy"] for p in m], [p["kl"] for p in m], color=COLOURS[arm], lw=2.2, marker="o", ms=4,
                label=arm)
    for arm, m in s["matched"].items():
        ax.axvline(m["accuracy"], color=COLOURS[arm], ls="--", lw=1, label=f"matched accuracy {arm} / rl")
    ax.set_xlabel("validation accuracy")
    ax.set_ylabel("exact KL(trained || base) per token")
    ax.set_title("Study 1: drift against accuracy, per checkpoint")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "study1_kl_vs_accuracy.png"))
    return files


def plot_study2(s: dict, out: Path) -> list[str]:
    plt = _pyplot()
    tasks = [t for t, _ in s["schedule"]]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in s["runs"].values():
            c = r["curves"][task]
            ax.plot([p["step"] for p in c], [p["accuracy"] for p in c], color=COLOURS[r["arm"]], lw=0.8, alpha=0.45)
        for arm, m in s["mean_curves"].items():
            c = m[task]
            ax.plot([p["step"] for p in c], [p["accuracy"] for p in c], color=COLOURS[arm], lw=2.2, marker="o",
                    ms=3, label=f"{arm} (mean of {len([r for r in s['runs'].values() if r['arm'] == arm])})")
        ax.set_title(f"validation accuracy on {task}")
        ax.set_xlabel("step")
    kl_ax = axes[0][-1]
    for r in s["runs"].values():
        steps = [p["step"] for p in r["curves"][tasks[0]]]
        kl = [_mean([_at(r["curves"][t], st, "kl") for t in tasks]) for st in steps]
        kl_ax.plot(steps, kl, color=COLOURS[r["arm"]], lw=0.8, alpha=0.45)
    for arm, m in s["mean_curves"].items():
        steps = [p["step"] for p in m[tasks[0]]]
        kl = [_mean([_at(m[t], st, "kl") for t in tasks]) for st in steps]
        kl_ax.plot(steps, kl, color=COLOURS[arm], lw=2.2, marker="o", ms=3, label=arm)
    kl_ax.set_title("KL(trained || base), mean over tasks")
    kl_ax.set_xlabel("step")
    for ax in axes[0]:
        for _, end in s["stage_ends"][:-1]:
            ax.axvline(end, color="grey", ls="--", lw=1)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Study 2: one run over " + " -> ".join(tasks) + " (dashed: task switches; thin lines are seeds)")
    return [_save(fig, out / "study2_continual.png")]


def plot_study3(s: dict, out: Path) -> list[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in ("from-base", "from-rl", "from-fst"):
        for r in (r for r in s["runs"].values() if r["arm"] == arm):
            c = r["curves"][s["task"]]
            ax.plot([p["step"] for p in c], [p["accuracy"] for p in c], color=COLOURS[arm], lw=0.8, alpha=0.45)
        m = s["mean_curves"][arm]
        ax.plot([p["step"] for p in m], [p["accuracy"] for p in m], color=COLOURS[arm], lw=2.2, marker="o", ms=4,
                label=arm)
    ax.set_xlabel("RL steps on the new task")
    ax.set_ylabel(f"validation accuracy ({s['task']})")
    ax.set_title("Study 3: fresh RL from three starting points (thin: seeds)")
    ax.legend(fontsize=8)
    return [_save(fig, out / "study3_plasticity.png")]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _cell(stats: dict, values: list, fmt: str = "{:.3f}") -> str:
    """mean ± sd (per seed), or the one value."""
    per_seed = ", ".join(_f(v, fmt) for v in values)
    return per_seed if len(values) == 1 else f"{_ms(stats, fmt)} ({per_seed})"


def readme(summary: dict) -> str:
    st = summary["settings"]
    records = st["records"]
    lines = ["# FST against RL in miniature", "",
             "Made by `experiments/miniature.py` (the numbers below are generated from `summary.json`; do not "
             "edit by hand). " + ("**--quick run on a tiny random model: the numbers mean nothing.**"
                                  if st["quick"] else f"Model: {st['model']}, base config `{BASE_CONFIG}`, "
                                                      f"dtype {st['dtype']}."), "",
             f"Every number comes from the runs' records in [`{records}/`]({records}/) (per run: metrics, pool "
             "files, config, the measurements after training; no weights); `python experiments/miniature.py "
             "--study N --report-only` rebuilds this file, the plots and summary.json from them alone.", "",
             "Accuracy = the share of validation samples that are fully right (reward 1), on fixed held-out "
             "problems with the same sampling draws at every validation. Mean reward, which counts the 0.1 "
             "format credit, is in summary.json as `mean_reward`. Over seeds: mean ± sample standard deviation "
             "(per-seed values in brackets). Comparisons are paired by seed (the same seed draws the same "
             "training problems and validation samples in every arm): the mean of the per-seed differences "
             f"with a 95% percentile bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the seeds, generator "
             f"seed {BOOTSTRAP_SEED}). An interval that contains 0 is called *no difference at this scale*; one "
             "above or below 0 *ahead* or *behind*, in the direction the row calls better. With fewer than "
             f"{SMALL_N} seeds such an interval is no wider than the range of the differences, so its verdict is "
             "marked as a sign; one seed gives no interval (*n/a (one seed)*). A seed that never reached a "
             "threshold leaves that comparison *not comparable*.", ""]
    base = summary.get("base_accuracy")
    if base:
        s = base["settings"]
        lines += ["## Base model on each task (before any training)", "",
                  f"First {s['n']} test problems x {s['k']} samples, temperature {s['temperature']}, "
                  f"{s['max_new_tokens']} new tokens, base weights; made by `experiments/task_probe.py` "
                  f"({', '.join(sorted(set(base.get('commands', {}).values())))}).", "",
                  "| task | task's default prompt | task-agnostic prompt | other prompt |", "|---|---|---|---|"]
        for name, r in base["tasks"].items():
            other = ", ".join(f"{r[k]['accuracy']:.3f} ({k})" for k in r if k not in ("default", "agnostic"))
            dropped = "" if name in rewards.TASKS else " (measured, then dropped: below 5%)"
            lines.append(f"| {name}{dropped} | {r['default']['accuracy']:.3f} | {r['agnostic']['accuracy']:.3f} "
                         f"| {other} |")
        lines.append("")
    studies = summary["studies"]
    for n, render in (("1", _readme_study1), ("2", _readme_study2), ("3", _readme_study3)):
        if n in studies:
            lines += render(studies[n])
    return "\n".join(lines) + "\n"


def _header(s: dict, title: str) -> list[str]:
    machines = "; ".join(f"{m['model'] or 'unknown CPU'} ("
                         + ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in m["flags"].items()) + ")"
                         for m in s["machines"]) or "not recorded"
    return [f"## {title}", "",
            "Runs made by: " + "; ".join(f"`{c}`" for c in s["commands"]) + "  ",
            f"Report: `{s['report_command']}`  ",
            f"Measured time of the {len(s['runs'])} runs: {_duration(s['wall_seconds'])} "
            f"(training {_duration(s['seconds_training'])}, measurements after training "
            f"{_duration(s['seconds_measuring'])}; threads {', '.join(map(str, s['threads'])) or 'not recorded'}); "
            f"dtype {s['dtype']}; machines: {machines}.", ""]


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|")  # KL(trained || base) inside a table


def _comparison_table(comparisons: list[dict]) -> list[str]:
    lines = ["| number | arm - reference | seeds paired | mean difference | 95% interval | verdict |",
             "|---|---|---|---|---|---|"]
    for c in comparisons:
        fmt = c["fmt"].replace("{:", "{:+", 1)
        ci = f"[{fmt.format(c['ci95'][0])}, {fmt.format(c['ci95'][1])}]" if c["ci95"] else "n/a"
        lines.append(f"| {_cell_text(c['what'])} ({c['better']} is better) | {c['arm']} - {c['against']} | "
                     f"{', '.join(map(str, c['seeds'])) or '-'} | {_f(c['mean_diff'], fmt)} | {ci} | "
                     f"{c['verdict']} |")
    return lines


def _readme_study1(s: dict) -> list[str]:
    pa, st, reach = s["per_arm"], s["per_arm_stats"], s["steps_to_rl_best"]
    lines = _header(s, "Study 1: sample efficiency and drift") + [
        f"Task `{s['task']}`, {s['steps']} steps, arms {', '.join(s['arms'])}, seeds {s['seeds']} (gepa: the "
        f"first), validation every {s['eval_every']} steps on {s['eval_n']} problems x {s['eval_k']} samples.", "",
        "![accuracy](study1_accuracy.png)", "",
        "| arm | seeds | final accuracy | best accuracy | mean accuracy after step 0 | steps to rl's best mean "
        "(mean curve; per seed) | final KL | rollouts RL + fast | training time / run |",
        "|---|---|---|---|---|---|---|---|---|"]
    for arm in s["arms"]:
        p, t = pa[arm], st[arm]
        lines.append(f"| {arm} | {', '.join(map(str, p['seeds']))} | "
                     f"{_cell(t['final_accuracy'], p['final_accuracy'])} | "
                     f"{_cell(t['best_accuracy'], p['best_accuracy'])} | "
                     f"{_cell(t['mean_accuracy_during_training'], p['mean_accuracy_during_training'])} | "
                     f"{_f(reach[arm]['step'], '{}')} ({', '.join(_f(v, '{}') for v in p['steps_to_rl_best'])}) | "
                     f"{_cell(t['final_kl'], p['final_kl'], '{:.5f}')} | "
                     f"{_f(_mean(p['rollouts_rl']), '{:.0f}')} + {_f(_mean(p['rollouts_fast']), '{:.0f}')} | "
                     f"{_duration(_mean(p['seconds_training']) or 0)} |")
    lines += ["", f"rl's best mean validation accuracy: {_f(s['rl_best_mean_accuracy'])}. \"Steps to rl's best "
              "mean\" is the first validation step at which a curve reaches it; a seed that never does leaves "
              "that comparison not comparable. \"The seed's matched accuracy\" is, per seed, the highest "
              "accuracy both the arm's and rl's curves of that seed reach, so every seed has a value: the RL "
              f"steps (to the nearest validation, every {s['eval_every']} steps), all rollouts and KL at that "
              "level are paired by seed.", "",
              "Paired by seed against rl (and fst-reuse against fst, where both ran):", "",
              *_comparison_table(s["comparisons"]),
              "", "![KL against accuracy](study1_kl_vs_accuracy.png)", "",
              "Matched accuracy: the highest accuracy both an arm's and rl's mean curves reach; each arm's KL there "
              "is read off its mean curve where it first reaches that accuracy (linear between the two validation "
              "points around the crossing). KL is exact (eval.kl_to_base, full vocabulary), with the prompt "
              f"deployed at that checkpoint, on {s['kl_n']} held-out problems; gepa never updates the weights, so "
              "its KL is 0.", ""]
    for arm, m in s["matched"].items():
        lines.append(f"- {arm}: matched accuracy {_f(m['accuracy'])}; KL there {arm} "
                     f"{_f(m['kl_mean_curve'][arm], '{:.5f}')}, rl {_f(m['kl_mean_curve']['rl'], '{:.5f}')}: "
                     f"{_f(m['kl_fraction_of_rl'], '{:.2f}')} of rl's.")
    for arm, t in s["two_by_two_accuracy_mean"].items():
        lines += ["", f"2x2 at the end of {arm} (eval.two_by_two; accuracy, mean over {len(pa[arm]['seeds'])} "
                  "seeds; the validation problems and sampling seed: base + seed is the step-0 validation, "
                  "trained + seed and trained + evolved the last one, base + evolved measured after training):", "",
                  "| weights \\ prompt | seed | evolved |", "|---|---|---|",
                  f"| base | {_f(t['base']['seed'])} | {_f(t['base']['evolved'])} |",
                  f"| trained | {_f(t['trained']['seed'])} | {_f(t['trained']['evolved'])} |"]
    for arm, f in s.get("fast_loop", {}).items():
        ops = list(f["proposals"])
        lines += ["", f"Fast loop of {arm} ({f['rounds']} rounds over {len(pa[arm]['seeds'])} seeds): proposals and "
                  "acceptances by operator; the reflect operator's replies, the share no guard rejected, and its "
                  "rejections by reason.", "",
                  "| | " + " | ".join(ops) + " |", "|---|" + "---|" * len(ops),
                  "| proposals | " + " | ".join(str(f["proposals"][o]) for o in ops) + " |",
                  "| accepted | " + " | ".join(str(f["accepted"].get(o, 0)) for o in ops) + " |", "",
                  f"reflect: {f['reflect_replies']} replies, guard pass rate {_f(f['reflect_guard_pass_rate'], '{:.2f}')}; "
                  "rejected: " + (", ".join(f"{k} {n}" for k, n in f["reflect_rejected"].items() if n) or "none") + "."]
        lines += [f"- reflect child (seed {c['seed']}, born at step {c['born']}): \"{' '.join(c['instruction'][:300].split())}\""
                  for c in f["reflect_children"]]
    if "against_float32" in s:
        lines += ["", f"{s['dtype']} against float32, run by run (the float32 record of the same arm and seed; "
                  "within spread = the difference is at most one standard deviation of the float32 arm over its "
                  "seeds):", "",
                  "| arm | seed | final accuracy float32 -> this | difference | float32 seed sd | within spread | "
                  "final KL float32 -> this | difference | float32 seed sd | within spread |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["against_float32"]:
            cells = []
            for key, fmt in (("final_accuracy", "{:.3f}"), ("final_kl", "{:.5f}")):
                c = r[key]
                cells += [f"{_f(c['float32'], fmt)} -> {_f(c['bfloat16'], fmt)}",
                          _f(c["diff"], fmt.replace("{:", "{:+", 1)), _f(c["float32_seed_sd"], fmt),
                          {True: "yes", False: "**no**", None: "n/a"}[c["within_spread"]]]
            lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(cells) + " |")
        if not s["against_float32"]:
            lines.append("(no float32 record of the same arm and seed)")
    return lines + [""]


def _readme_study2(s: dict) -> list[str]:
    tasks = [t for t, _ in s["schedule"]]
    lines = _header(s, "Study 2: continual learning") + [
        "Schedule: " + " -> ".join(f"{t} ({n} steps)" for t, n in s["schedule"]) + f", seeds {s['seeds']}, one "
        f"task-agnostic seed prompt for every task (\"{s['seed_prompt']}\"; each task's worked example is an "
        f"earlier chat turn, not part of the prompt), every task validated every {s['eval_every']} steps.", "",
        "![continual](study2_continual.png)", "",
        "Accuracy on each task at the end of each stage:", "",
        "| run | after stage | " + " | ".join(tasks) + " | KL (mean over tasks) |",
        "|---|---|" + "---|" * len(tasks) + "---|"]
    for name, r in s["runs"].items():
        for stage, _ in s["stage_ends"]:
            lines.append(f"| {name} | {stage} | " + " | ".join(_f(r["at_stage_end"][stage][t]) for t in tasks)
                         + f" | {_f(r['kl_at_stage_end'][stage], '{:.5f}')} |")
    lines += ["", "Forgetting = accuracy on a task at the end of its own stage minus at the end of the run. "
              "Over seeds (mean ± sd):", "",
              "| number | " + " | ".join(s["per_arm_stats"]) + " |", "|---|" + "---|" * len(s["per_arm_stats"])]
    for what in next(iter(s["per_arm_stats"].values())):
        fmt = "{:.5f}" if "KL" in what else "{:.3f}"
        lines.append(f"| {_cell_text(what)} | " + " | ".join(_ms(st[what], fmt) for st in s["per_arm_stats"].values())
                     + " |")
    lines += ["", "Paired by seed, fst against rl:", ""] + _comparison_table(s["comparisons"]) + [""]
    return lines


def _readme_study3(s: dict) -> list[str]:
    lines = _header(s, "Study 3: plasticity") + [
        f"Fresh rl on `{s['task']}` for {s['steps']} steps, seeds {s['seeds']}, from the base model, from study 1's "
        "rl run of the same seed and from study 1's fst run of the same seed (`init_from`, new optimiser, "
        "the task's own seed prompt).", "", "![plasticity](study3_plasticity.png)", "",
        "| start | seeds | accuracy at step 0 | final accuracy | gain | final KL |", "|---|---|---|---|---|---|"]
    for arm, p in s["per_arm"].items():
        t = s["per_arm_stats"][arm]
        lines.append(f"| {arm} | {', '.join(map(str, p['seeds']))} | "
                     f"{_cell(t['start_accuracy'], p['start_accuracy'])} | "
                     f"{_cell(t['final_accuracy'], p['final_accuracy'])} | "
                     f"{_cell(t['gain'], p['gain'], '{:+.3f}')} | {_cell(t['final_kl'], p['final_kl'], '{:.5f}')} |")
    if s["starts_not_as_recorded"]:
        lines += ["", f"**Note:** the starting checkpoints of {', '.join(s['starts_not_as_recorded'])} were trained "
                  "again on the machine that ran study 3 and validated differently from their study-1 records: "
                  "those study-3 runs start from other weights than study 1 reports."]
    lines += ["", "Paired by seed:", ""] + _comparison_table(s["comparisons"]) + [""]
    return lines


# ---------------------------------------------------------------------------------------------
# Estimates, the tiny model for --quick, and the command line.

def run_cost(spec: RunSpec, sizes: Sizes, fast_every: int) -> float:
    """Expected seconds of one run and its measurements, from the COST_* constants (2 quiet cores)."""
    evals, n_tasks = spec.steps // sizes.eval_every + 1, len(spec.tasks)
    prompts = 1 if spec.mode == "rl" else 2
    t = spec.steps * (COST_GEPA_STEP if spec.mode == "gepa" else COST_RL_STEP) + COST_MODEL_LOAD
    t += (spec.steps // fast_every) * COST_FAST_ROUND if spec.mode != "rl" else 0
    t += evals * n_tasks * prompts * sizes.eval_n * sizes.eval_k * COST_EVAL_SAMPLE
    if spec.mode != "gepa":  # (init_from runs measure step 0 too: one more, left out of the estimate)
        t += (evals - 1) * (COST_MODEL_LOAD + n_tasks * sizes.kl_n * COST_KL_PROBLEM)
    if spec.two_by_two:
        t += COST_MODEL_LOAD + sizes.eval_n * sizes.eval_k * COST_EVAL_SAMPLE
    return t


def runs_to_train(study: str, sizes: Sizes, places: Places) -> list[RunSpec]:
    """The runs this invocation will train: those with neither a record nor a finished run folder,
    and the study-1 starting points of study-3 runs without a record."""
    specs = SPECS[study](sizes, places.runs_dir)
    todo = [s for s in specs if not (places.records_dir / s.name).is_dir()]
    starts = {s.start for s in todo if s.start}
    firsts = study1_specs(dataclasses.replace(sizes, study1_arms=("rl", "fst"), seeds=sizes.study3_seeds))
    wanted = {s.name: s for s in firsts if s.name in starts} | {s.name: s for s in todo}  # one each
    return [s for s in wanted.values() if not is_finished(s, places.runs_dir)]


def build_tiny_model(folder: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (as tests/conftest.py builds it), saved once."""
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = infra.load_tokenizer(infra.resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def recorded_arms(records_dir: Path, dtype: str) -> list[str]:
    """Study-1 arms with at least one record in `dtype`, in ARMS order."""
    found = {m["arm"] for p in (records_dir.glob("s1-*") if records_dir.is_dir() else [])
             if (m := NAME.match(p.name)) and (m["dtype"] or "") == DTYPES[dtype]}
    return [a for a in ARMS if a in found]


def choose_runs(args, sizes: Sizes, records_dir: Path, chosen: list[str]):
    """Seeds and study-1 arms: as given; otherwise the defaults plus whatever already has a record (a
    report never silently shrinks), and with --report-only exactly what has a record."""
    recorded = recorded_arms(records_dir, sizes.dtype)
    if args.study1_arms:
        sizes.study1_arms = tuple(args.study1_arms)
    elif args.report_only and recorded:
        sizes.study1_arms = tuple(a for a in ARMS if a in recorded or a == "rl")
    else:
        sizes.study1_arms = tuple(a for a in ARMS if a in STUDY1_ARMS or a in recorded)
    for study in chosen:
        have = recorded_seeds(records_dir, study, sizes.dtype)
        if args.seeds:
            seeds = args.seeds
        elif args.report_only and have:
            seeds = have
        else:
            seeds = set(sizes.study_seeds(study)) | have
        sizes.set_study_seeds(study, sorted(set(seeds)))


STUDIES = {"1": study1, "2": study2, "3": study3}
SPECS = {"1": lambda sizes, runs_dir: study1_specs(sizes), "2": lambda sizes, runs_dir: study2_specs(sizes),
         "3": study3_specs}
PLOTS = {"1": plot_study1, "2": plot_study2, "3": plot_study3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=["1", "2", "3", "all"], default="all")
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
    ap.add_argument("--study1-arms", nargs="+", choices=list(ARMS),
                    help="study 1's arms, rl among them (default rl fst gepa plus any arm already recorded; with "
                         "--report-only the recorded arms). fst-reuse = mode fst with fast.reuse=all")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                    help="model dtype of every run. Default float32: in the paired check (study 1, seed 0, rl and "
                         "fst; results/miniature/bf16/) bf16 ended 0.13-0.15 lower in final accuracy, outside the "
                         "float32 seed spread. auto = bfloat16 where /proc/cpuinfo lists avx512_bf16 or amx_bf16, else "
                         "float32. A bfloat16 run is named ...-bf16 and reported in RESULTS/bf16/")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild README, plots and summary.json from the committed records alone (no training, "
                         "no model); fails naming every missing record")
    args = ap.parse_args(argv)
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
        runs_dir.mkdir(parents=True, exist_ok=True)
        records_dir.mkdir(parents=True, exist_ok=True)
        if args.quick:
            build_tiny_model(runs_dir / "tiny-model")
        fast_every = fst.load_config(str(ROOT / BASE_CONFIG), sizes.extra).fast.every
        for s in chosen:
            todo = runs_to_train(s, sizes, places)
            cost = sum(run_cost(spec, sizes, fast_every) for spec in todo)
            print(f"[miniature] study {s}: runs to train: {len(todo)}" + ("" if args.quick else
                  f", expected about {_duration(cost)} on 2 quiet cores") + " (the others have a record or a "
                  "finished run folder)", file=sys.stderr)

    summary_file = report_dir / "summary.json"
    model_name = sizes.model or fst.load_config(str(ROOT / BASE_CONFIG)).model.name
    settings = {"quick": args.quick, "model": places.portable(model_name), "base_config": BASE_CONFIG,
                "dtype": dtype, "records": Path(os.path.relpath(records_dir, report_dir)).as_posix(),
                # seeds and arms are per study (each study's entry has its own): the invocation's choice for
                # the studies it did not rebuild would contradict the entries kept from other invocations
                "sizes": {k: v for k, v in vars(sizes).items()
                          if k not in ("model", "extra", "seeds", "study2_seeds", "study3_seeds", "study1_arms")}}
    base_file = ROOT / "results" / "miniature" / "base_accuracy.json"
    done = {}  # the studies this invocation has rebuilt
    for s in chosen:
        result = STUDIES[s](sizes, places)
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
        result["plots"] = PLOTS[s](result, report_dir)
        done[s] = result
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


def kept_studies(summary_file: Path, settings: dict) -> dict:
    """The entries of studies not rebuilt now, from summary.json: kept when they are of the same kind
    (quick or not, dtype) and made by this report format; an older entry is left out, said on stderr."""
    if not summary_file.exists():
        return {}
    on_disk = json.loads(summary_file.read_text())
    st = on_disk.get("settings", {})
    if st.get("quick") != settings["quick"] or st.get("dtype", "float32") != settings["dtype"]:
        return {}  # never mix quick and real numbers, or dtypes, in one summary
    kept = {k: v for k, v in on_disk.get("studies", {}).items() if v.get("format") == REPORT_FORMAT}
    for k in sorted(set(on_disk.get("studies", {})) - set(kept)):
        print(f"[miniature] study {k}: its summary.json entry predates the records; left out of the report "
              f"until `--study {k}` makes or reads its records", file=sys.stderr)
    return kept


if __name__ == "__main__":
    main()
