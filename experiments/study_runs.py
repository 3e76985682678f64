"""experiments/study_runs.py -- what the miniature studies run, with which settings, and their records.

The sizes of the studies (constants, --quick's replacements, `Sizes`), the machine a run is made on,
one `RunSpec` per arm x seed (an ordinary fst run folder under --runs-dir, started or resumed here),
the measurements made after training (exact KL per checkpoint, the 2x2 table: cached in the run
folder), and each run's small record in RESULTS/runs/<name>/ that the report is rebuilt from.
experiments/miniature.py says how it all fits together.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
from plumbing import checkpoints, models  # noqa: E402
import pool  # noqa: E402
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
COST_MODEL_LOAD = 3.0      # models.load_model for one checkpoint

# Study-1 arms: the fst settings each one adds. fst-reuse trains on every rollout of the fast rounds too
# (fast.reuse=all: with `pool` the first round, whose live pool is the seed prompt alone, gives one
# rollout per problem, which has no advantage, so it would keep nothing).
# fst pins fast.reuse=none: the fast loop as the paper has it, whatever the release default (all, since
# these runs measured it).
ARMS = {"rl": ["mode=rl"], "fst": ["mode=fst", "fast.reuse=none"], "gepa": ["mode=gepa"],
        "fst-reuse": ["mode=fst", "fast.reuse=all"]}
# Arms whose code is gone: contexts scored on the RL batch (fast.scoring=batch; one child under test at a
# time; trial rows as evidence only), at git tag arm/fst-batch. Their records are reported as made, with
# these settings; no new run of them can start.
RECORDED_ONLY = {"fst-batch": ["mode=fst", "fast.scoring=batch", "fast.reuse=none"],
                 "fst-batch-1c": ["mode=fst", "fast.scoring=batch", "fast.reuse=none", "fast.candidates=1"],
                 "fst-batch-ev": ["mode=fst", "fast.scoring=batch", "fast.reuse=none", "fast.train_on_trials=false"]}
ALL_ARMS = ARMS | RECORDED_ONLY         # in the report's order
# The dtype is part of a run's name when it is not float32, so fp32 and bf16 records never mix.
DTYPES = {"float32": "", "bfloat16": "-bf16", "bfloat16-fixed": "-bf16fix"}
# What each choice runs with. bfloat16-fixed: bf16 with the fixes bench/behaviour_logp.py --decompose
# supports on a CPU (issue 31): attention whose softmax is float32 (eager; SDPA's bf16 CPU kernel carried
# most of the sampler-trainer gap), a float32 head, and truncated importance sampling for the rest.
DTYPE_OVERRIDES = {"float32": [], "bfloat16": ["model.dtype=bfloat16"],
                   "bfloat16-fixed": ["model.dtype=bfloat16", "model.attn=eager", "model.fp32_head=true",
                                      "train.tis_cap=2.0"]}
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")  # what decides whether bf16 pays on a CPU
# A record: the run's files that describe it, small and text; never checkpoints or adapter weights.
RECORD_FILES = ("metrics.jsonl", "config.yaml", "summary.json", "miniature_run.json", "miniature_measure.json",
                "eval/*.json", "pool/*.json")
RECORDS = "runs"                        # records live in RESULTS/runs/<run-name>/
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
    study4_seeds: tuple = (0, 1, 2, 3, 4)  # study 4 (experiments/study4.py keeps its other sizes)
    study4_arms: tuple = ("rl", "fst")   # --study4-arms: the arms an invocation trains
    study4_quick: bool = False           # study 4's --quick sizes
    dtype: str = "float32"               # model.dtype of every run
    model: str = ""                      # "" = the base config's (smollm2-135m)
    extra: list = field(default_factory=list)   # more --set overrides for every run

    @classmethod
    def quick(cls, model_dir: str):
        q = {k.lower(): v for k, v in QUICK.items()}
        return cls(**q, study3_seeds=q["seeds"], study4_seeds=q["seeds"], study4_quick=True, model=model_dir,
                   extra=list(QUICK_OVERRIDES))

    def study_seeds(self, study: str) -> tuple:
        return getattr(self, SEED_FIELDS[study])

    def set_study_seeds(self, study: str, seeds):
        setattr(self, SEED_FIELDS[study], tuple(seeds))


SEED_FIELDS = {"1": "seeds", "2": "study2_seeds", "3": "study3_seeds", "4": "study4_seeds"}


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
    arm: str                 # a key of ALL_ARMS (study 1), rl / fst (study 2), or study 3's starting point
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


NAME = re.compile(r"^s(?P<study>\d)-(?P<arm>.+)-seed(?P<seed>\d+)(?P<dtype>-bf16(?:fix)?)?$")


def common_overrides(sizes: Sizes, seed: int) -> list[str]:
    out = [f"train.seed={seed}", f"eval.every={sizes.eval_every}", f"train.save_every={sizes.eval_every}",
           f"eval.n={sizes.eval_n}", f"eval.k={sizes.eval_k}", "device=cpu"]
    if sizes.model:
        out.append(f"model.name={sizes.model}")
    # float32 is the base config's dtype: left unsaid, so runs made before --dtype keep their arguments
    return out + sizes.extra + DTYPE_OVERRIDES[sizes.dtype]


def study1_specs(sizes: Sizes) -> list[RunSpec]:
    specs = []
    for arm in sizes.study1_arms:
        mode = ALL_ARMS[arm][0].removeprefix("mode=")
        for seed in sizes.seeds[:1] if arm == "gepa" else sizes.seeds:
            specs.append(RunSpec("1", arm, seed, sizes.study1_steps, common_overrides(sizes, seed) + ALL_ARMS[arm] + [
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
    ckpt = checkpoints.latest_checkpoint(run_dir)
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
    if spec.arm in RECORDED_ONLY:
        raise SystemExit(f"{spec.name}: arm {spec.arm} is reported from its records only (its code is at git tag "
                         "arm/fst-batch) and has no record for this seed; leave it out with --study1-arms")
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
            ckpt, prompt = checkpoints.find_checkpoint(cfg.init_from), None  # None: the run's seed prompt
        else:
            ckpt = run_dir / "checkpoints" / f"step_{step - 1:06d}"  # eval step s = the weights after s updates
            if not ckpt.is_dir():
                raise SystemExit(f"{ckpt} missing: validation at step {step} has no checkpoint "
                                 "(train.save_every must equal eval.every)")
            prompt = pool.best_context(ckpt)
        model, tok = models.load_model(cfg.model, torch.device("cpu"), adapter_path=str(ckpt))
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
        ckpt = checkpoints.latest_checkpoint(run_dir)
        rows = [r for r in evaluation.read_metrics(run_dir) if r.get("kind") == "eval" and r["task"] == task_name]
        last = max(r["step"] for r in rows)
        logged = {(r["step"], r["prompt"]): r for r in rows}
        model, tok = models.load_model(cfg.model, torch.device("cpu"), adapter_path=str(ckpt))
        task = evaluation.make_task(task_name, cfg)
        evolved = pool.best_context(ckpt)
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
           "reflector_calls": last.get("reflector_calls", 0),
           # the training steps' own seconds (sampling, update, fast round), validation and loading left out
           "seconds_steps": round(sum(r.get("seconds_step", 0.0) for r in train), 1)}
    if spec.two_by_two:
        out["two_by_two"] = cache["two_by_two"]
    if spec.arm != "rl" and spec.study == "1":
        out["fast_loop"] = fast_loop_summary(record)
    return out


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
    tok = models.load_tokenizer(models.resolve_model_path("smollm2-135m"))
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
    """Study-1 arms with at least one record in `dtype`, in ALL_ARMS order."""
    found = {m["arm"] for p in (records_dir.glob("s1-*") if records_dir.is_dir() else [])
             if (m := NAME.match(p.name)) and (m["dtype"] or "") == DTYPES[dtype]}
    return [a for a in ALL_ARMS if a in found]
SPECS = {"1": lambda sizes, runs_dir: study1_specs(sizes), "2": lambda sizes, runs_dir: study2_specs(sizes),
         "3": study3_specs}
