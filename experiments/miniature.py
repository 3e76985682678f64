"""experiments/miniature.py -- FST against RL at CPU scale: the paper's three studies on SmolLM2-135M.

    python experiments/miniature.py --study all --threads 2     # writes results/miniature/
    python experiments/miniature.py --study 1                   # one study; the others stay as they are
    python experiments/miniature.py --quick --out /tmp/mini     # the same code on a tiny random model, ~1 min

Study 1, sample efficiency and drift: arms rl, fst and gepa on one task, the same data stream and
seeds, validated every EVAL_EVERY steps on fixed held-out problems; accuracy against RL steps and
against all rollouts (RL + fast loop), steps to reach RL's best, exact KL(trained || base) against
accuracy, the 2x2 table {base, trained weights} x {seed, evolved prompt} at the end of each fst run.
Study 2, continual learning: one run over a schedule of tasks with a task-agnostic seed prompt, rl
against fst, every task validated throughout: accuracy at the end of each stage and forgetting.
Study 3, plasticity: fresh rl on a new task from the base model, from study 1's rl checkpoint and
from study 1's fst checkpoint (init_from), same steps and seeds.

How it runs: every arm x seed is one ordinary fst run folder under --runs-dir, started with the
arguments a user would type (fst.main, on configs/tiny.yaml plus --set overrides). A re-invocation
skips finished runs and resumes interrupted ones (--resume), so a study can be continued in a later
session. Measurements after training call eval.py (exact KL at every validation checkpoint, the
2x2 table) and are cached in the run folder. Tables, plots and summary.json are rebuilt from the run
folders every time; summary.json keeps the entries of studies not run in this invocation.
Accuracy is the share of samples fully right (reward >= 1), never the mean reward: the tiny
config's 0.1 format credit would show format learning as skill.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
# has run changes its runs' arguments: the script then refuses to reuse those run folders.
BASE_CONFIG = "configs/tiny.yaml"       # SmolLM2-135M, B=2 problems x G=8 rollouts, 64 new tokens
SEEDS = (0, 1)                          # seeds of the rl and fst arms (studies 1 and 3); gepa: the first
EVAL_EVERY = 6                          # validate (and checkpoint) every N steps; = fast.every, so each
                                        # validation of fst comes right after a fast round
EVAL_N, EVAL_K = 24, 4                  # fixed held-out problems x samples each, the same draws every time
KL_N = 12                               # held-out problems, 1 completion each, for the exact KL per checkpoint
# Tasks the base model gets right 13-25% of the time (results/miniature/base_accuracy.json).
STUDY1_TASK, STUDY1_STEPS = "add", 18
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

# --quick: the same code on a 2-layer random Llama built in-process, a handful of steps.
QUICK = dict(SEEDS=(0, 1), EVAL_EVERY=2, EVAL_N=2, EVAL_K=2, KL_N=2, STUDY1_STEPS=4,
             STUDY2_SCHEDULE=(("compare", 2), ("word_count", 2)), STUDY2_SEEDS=(0,), STUDY3_STEPS=2)
QUICK_OVERRIDES = ["sampling.max_new_tokens=8", "sampling.group_size=4", "fast.every=2", "fast.budget=1",
                   "fast.reflector_max_new_tokens=8", "train.lr=0.01"]


@dataclass
class Sizes:
    seeds: tuple = SEEDS
    eval_every: int = EVAL_EVERY
    eval_n: int = EVAL_N
    eval_k: int = EVAL_K
    kl_n: int = KL_N
    study1_steps: int = STUDY1_STEPS
    study1_arms: tuple = ("rl", "fst", "gepa")  # --study1-arms: a subset when time is short (said in the README)
    study2_schedule: tuple = STUDY2_SCHEDULE
    study2_seeds: tuple = STUDY2_SEEDS
    study3_steps: int = STUDY3_STEPS
    model: str = ""                      # "" = the base config's (smollm2-135m)
    extra: list = field(default_factory=list)   # more --set overrides for every run

    @classmethod
    def quick(cls, model_dir: str):
        q = {k.lower(): v for k, v in QUICK.items()}
        return cls(**q, model=model_dir, extra=list(QUICK_OVERRIDES))


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


# ---------------------------------------------------------------------------------------------
# Runs: one fst run folder per arm x seed.

@dataclass
class RunSpec:
    study: str
    arm: str                 # rl / fst / gepa, or study 3's starting point
    seed: int
    steps: int               # total steps, to know when the run is finished
    overrides: list          # --set key=value on top of BASE_CONFIG
    tasks: list              # the tasks it trains on (validated throughout)

    @property
    def name(self) -> str:
        return f"s{self.study}-{self.arm}-seed{self.seed}"


def common_overrides(sizes: Sizes, seed: int) -> list[str]:
    out = [f"train.seed={seed}", f"eval.every={sizes.eval_every}", f"train.save_every={sizes.eval_every}",
           f"eval.n={sizes.eval_n}", f"eval.k={sizes.eval_k}", "device=cpu"]
    if sizes.model:
        out.append(f"model.name={sizes.model}")
    return out + sizes.extra


def study1_specs(sizes: Sizes) -> list[RunSpec]:
    specs = []
    for arm in sizes.study1_arms:
        for seed in sizes.seeds[:1] if arm == "gepa" else sizes.seeds:
            specs.append(RunSpec("1", arm, seed, sizes.study1_steps, common_overrides(sizes, seed) + [
                f"mode={arm}", f"task.name={STUDY1_TASK}", "task.system_prompt=''",
                f"train.steps={sizes.study1_steps}"], [STUDY1_TASK]))
    return specs


def study2_specs(sizes: Sizes) -> list[RunSpec]:
    stages = ", ".join(f"{{name: {name}, steps: {steps}, options: {{format_reward: 0.1}}}}"
                       for name, steps in sizes.study2_schedule)
    total = sum(steps for _, steps in sizes.study2_schedule)
    return [RunSpec("2", arm, seed, total, common_overrides(sizes, seed) + [
        f"mode={arm}", f"schedule=[{stages}]", "task.system_prompt=''"],  # '' = rewards.TASK_AGNOSTIC_PROMPT
        [name for name, _ in sizes.study2_schedule])
        for arm in ("rl", "fst") for seed in sizes.study2_seeds]


def study3_specs(sizes: Sizes, runs_dir: Path) -> list[RunSpec]:
    specs = []
    for start in ("base", "rl", "fst"):
        for seed in sizes.seeds:
            init = [] if start == "base" else [f"init_from={runs_dir / f's1-{start}-seed{seed}'}"]
            specs.append(RunSpec("3", f"from-{start}", seed, sizes.study3_steps, common_overrides(sizes, seed) + [
                "mode=rl", f"task.name={STUDY3_TASK}", "task.system_prompt=''",
                f"train.steps={sizes.study3_steps}", *init], [STUDY3_TASK]))
    return specs


def portable(text: str, runs_dir: Path) -> str:
    """Committed results name no folder of the machine that made them: run folders are written
    relative to --runs-dir (`<runs-dir>/s1-rl-seed0`), files of the repo relative to it."""
    return text.replace(str(Path(runs_dir).resolve()), "<runs-dir>").replace(str(runs_dir), "<runs-dir>").replace(
        str(ROOT) + "/", "")


def last_step_saved(run_dir: Path) -> int | None:
    ckpt = infra.latest_checkpoint(run_dir)
    return int(ckpt.name.removeprefix("step_")) if ckpt and ckpt.is_dir() else None


def is_finished(spec: RunSpec, runs_dir: Path) -> bool:
    saved = last_step_saved(runs_dir / spec.name)
    return saved is not None and saved >= spec.steps - 1


def ensure_run(spec: RunSpec, runs_dir: Path) -> Path:
    """Start, resume or skip one run. RUN/miniature_run.json keeps its fst command and the seconds of
    every invocation (written before fst starts, so a killed session still leaves a record)."""
    run_dir = runs_dir / spec.name
    argv = ["--config", str(ROOT / BASE_CONFIG), "--set", f"out_dir={runs_dir}", "--set", f"run_name={spec.name}"]
    for item in spec.overrides:
        argv += ["--set", item]
    record = read_record(run_dir)
    if record and record["overrides"] != spec.overrides:
        raise SystemExit(f"{run_dir} was started with other settings than this script now asks for "
                         f"(a size constant changed?); delete the folder or use another --runs-dir")
    if is_finished(spec, runs_dir):
        return run_dir
    saved = last_step_saved(run_dir)
    if saved is None or record is None:  # new, or interrupted before its first checkpoint: start afresh
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        record = {"overrides": spec.overrides, "command": "python fst.py " + " ".join(_quote(a) for a in argv),
                  "segments": []}
        how, args = "start", argv
    else:
        how, args = f"resume after step {saved}", ["--resume", str(run_dir)]
    print(f"[miniature] {spec.name}: {how} ({spec.steps} steps)", file=sys.stderr)
    segment = {"how": how, "started": time.time(), "seconds": None, "finished": False}
    record["segments"].append(segment)
    write_record(run_dir, record)
    t0 = time.perf_counter()
    try:
        fst.main(args)
        segment["finished"] = True
    finally:  # an interrupted segment still counts its time
        segment["seconds"] = round(time.perf_counter() - t0, 1)
        write_record(run_dir, record)
        gc.collect()
    return run_dir


def read_record(run_dir: Path) -> dict | None:
    """RUN/miniature_run.json; a segment a killed process left without its seconds gets them from
    the last write to metrics.jsonl."""
    path = run_dir / "miniature_run.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    metrics = run_dir / "metrics.jsonl"
    for segment in record["segments"]:
        if segment["seconds"] is None:
            end = metrics.stat().st_mtime if metrics.exists() else segment["started"]
            segment["seconds"] = round(max(0.0, end - segment["started"]), 1)
    return record


def write_record(run_dir: Path, record: dict):
    (run_dir / "miniature_run.json").write_text(json.dumps(record, indent=1))


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_./=:," for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


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
# Curves and the numbers read off them.

def run_curves(run_dir: Path, tasks: list[str]) -> dict:
    """{task: [{step, accuracy, mean_reward, pass_at_k, rollouts_rl, rollouts_all, accuracy_seed_prompt}]}
    for the policy as deployed (prompt "best" in fst/gepa, "seed" in rl)."""
    rows = evaluation.read_metrics(run_dir)
    out = {}
    for name in tasks:
        seed_rows = {r["step"]: r for r in rows if r.get("kind") == "eval" and r["task"] == name
                     and r["prompt"] == "seed"}
        out[name] = [{"step": r["step"], "accuracy": r["accuracy"], "mean_reward": r["mean_at_k"],
                      "pass_at_k": r["pass_at_k"], "rollouts_rl": r["rollouts_rl"],
                      "rollouts_all": r["rollouts_rl"] + r["rollouts_fast"],
                      "accuracy_seed_prompt": seed_rows.get(r["step"], {}).get("accuracy")}
                     for r in evaluation.val_curve(rows, name)]
    return out


def run_summary(spec: RunSpec, run_dir: Path, sizes: Sizes) -> dict:
    curves = run_curves(run_dir, spec.tasks)
    kl = measure_kl(run_dir, spec.tasks, sizes.kl_n)
    for name, curve in curves.items():
        for point in curve:
            point["kl"] = kl.get(point["step"], {}).get(name)
    record = read_record(run_dir) or {"command": "unknown (no miniature_run.json)", "segments": []}
    train = [r for r in evaluation.read_metrics(run_dir) if r.get("kind", "train") == "train"]
    last = train[-1] if train else {}
    return {"run_dir": str(run_dir), "arm": spec.arm, "seed": spec.seed, "steps": spec.steps,
            "command": record["command"], "curves": curves,
            "seconds_training": round(sum(s["seconds"] for s in record["segments"]), 1),
            "seconds_measuring": round(_cache(run_dir)["seconds"], 1),
            "rollouts_rl": last.get("rollouts_rl", 0), "rollouts_fast": last.get("rollouts_fast", 0),
            "reflector_calls": last.get("reflector_calls", 0)}


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


def spread(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) - min(values) if len(values) >= 2 else None


def judge(what: str, a_name: str, a_values: list, b_name: str, b_values: list, fmt="{:.3f}") -> str:
    """One sentence comparing per-seed values of two arms against the spread between seeds: a
    difference no larger than the larger arm's seed spread is 'no difference at this scale'."""
    a_vals, b_vals = [v for v in a_values if v is not None], [v for v in b_values if v is not None]
    never = [f"{len(vs) - len(ok)} of {len(vs)} {name} seeds never got there"
             for name, vs, ok in ((a_name, a_values, a_vals), (b_name, b_values, b_vals)) if len(ok) < len(vs)]
    if not a_vals or not b_vals:
        return f"{what}: not comparable ({'; '.join(never)})."
    if never:  # a seed that never got there has no value; comparing the others would flatter that arm
        return (f"{what}: {a_name} {', '.join(fmt.format(v) for v in a_vals)} vs {b_name} "
                f"{', '.join(fmt.format(v) for v in b_vals)}; {'; '.join(never)}, so no mean is compared.")
    ma, mb = statistics.fmean(a_vals), statistics.fmean(b_vals)
    spreads = [s for s in (spread(a_vals), spread(b_vals)) if s is not None]
    head = (f"{what}: {a_name} {fmt.format(ma)} vs {b_name} {fmt.format(mb)} "
            f"(mean over {len(a_vals)} and {len(b_vals)} seeds)")
    if not spreads:
        return head + "; one seed each, so the seed spread is unknown and no difference can be called."
    s, diff = max(spreads), ma - mb
    if abs(diff) <= s:
        return head + (f"; the difference {fmt.format(diff)} is within the seed spread {fmt.format(s)}: "
                       "no difference at this scale.")
    return head + (f"; {a_name} is {'higher' if diff > 0 else 'lower'} by {fmt.format(abs(diff))}, more than the "
                   f"seed spread {fmt.format(s)}.")


# ---------------------------------------------------------------------------------------------
# The studies: run (or resume) their runs, measure, summarise.

def study1(sizes: Sizes, runs_dir: Path) -> dict:
    specs = study1_specs(sizes)
    runs = {}
    for spec in specs:
        runs[spec.name] = run_summary(spec, ensure_run(spec, runs_dir), sizes)
        if spec.arm == "fst":
            runs[spec.name]["two_by_two"] = measure_two_by_two(runs_dir / spec.name, STUDY1_TASK)
    task = STUDY1_TASK
    arms = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in ("rl", "fst", "gepa")}
    curves = {arm: [r["curves"][task] for r in rs] for arm, rs in arms.items()}
    means = {arm: mean_curve(c) for arm, c in curves.items()}
    target = max(p["accuracy"] for p in means["rl"])
    reach = {arm: {"step": first_reach(means[arm], target),
                   "rollouts_all": first_reach(means[arm], target, "rollouts_all"),
                   "per_seed_step": [first_reach(c, target) for c in curves[arm]]} for arm in arms}
    rl_step = reach["rl"]["step"]
    for arm in arms:
        s = reach[arm]["step"]
        reach[arm]["rl_steps_over_these"] = rl_step / s if s and rl_step is not None else None
    # Matched accuracy: the highest accuracy that both the rl and the fst mean curves reach.
    matched = min(max(p["accuracy"] for p in means["rl"]), max(p["accuracy"] for p in means["fst"]))
    kl_matched = {arm: {"mean_curve": kl_at_accuracy(means[arm], matched),
                        "per_seed": [kl_at_accuracy(c, matched) for c in curves[arm]]} for arm in ("rl", "fst")}
    rl_kl, fst_kl = kl_matched["rl"]["mean_curve"], kl_matched["fst"]["mean_curve"]
    out = {
        "task": task, "steps": sizes.study1_steps, "seeds": list(sizes.seeds), "eval_every": sizes.eval_every,
        "eval_n": sizes.eval_n, "eval_k": sizes.eval_k, "kl_n": sizes.kl_n, "runs": runs,
        "mean_curves": means, "rl_best_mean_accuracy": target, "steps_to_rl_best": reach,
        "matched_accuracy": matched, "kl_at_matched_accuracy": kl_matched,
        "fst_kl_fraction_of_rl": fst_kl / rl_kl if fst_kl is not None and rl_kl else None,
        "per_arm": {arm: {"final_accuracy": [c[-1]["accuracy"] for c in curves[arm]],
                          "best_accuracy": [max(p["accuracy"] for p in c) for c in curves[arm]],
                          # the mean over the validations after step 0: sample efficiency in one number
                          "mean_accuracy_during_training": [_mean([p["accuracy"] for p in c[1:]]) for c in curves[arm]],
                          "final_kl": [c[-1]["kl"] for c in curves[arm]],
                          "seconds_training": [r["seconds_training"] for r in rs],
                          "seconds_measuring": [r["seconds_measuring"] for r in rs],
                          "rollouts_rl": [r["rollouts_rl"] for r in rs],
                          "rollouts_fast": [r["rollouts_fast"] for r in rs]}
                    for arm, rs in arms.items()},
    }
    fst_tables = [r["two_by_two"] for r in arms["fst"]]
    out["two_by_two_accuracy_mean"] = {
        w: {p: _mean([t["accuracy"][w][p] for t in fst_tables]) for p in evaluation.PROMPTS}
        for w in evaluation.WEIGHTS}
    pa = out["per_arm"]
    out["findings"] = [
        judge("final validation accuracy", "fst", pa["fst"]["final_accuracy"], "rl", pa["rl"]["final_accuracy"]),
        judge("best validation accuracy", "fst", pa["fst"]["best_accuracy"], "rl", pa["rl"]["best_accuracy"]),
        judge("mean validation accuracy over training (after step 0)", "fst",
              pa["fst"]["mean_accuracy_during_training"], "rl", pa["rl"]["mean_accuracy_during_training"]),
        judge("final validation accuracy", "gepa", pa["gepa"]["final_accuracy"], "rl", pa["rl"]["final_accuracy"]),
        judge(f"steps to reach rl's best mean accuracy {target:.3f}", "fst", reach["fst"]["per_seed_step"],
              "rl", reach["rl"]["per_seed_step"], fmt="{:.1f}"),
        judge(f"KL at matched accuracy {matched:.3f}", "fst", kl_matched["fst"]["per_seed"],
              "rl", kl_matched["rl"]["per_seed"], fmt="{:.5f}"),
        judge("final KL(trained || base)", "fst", pa["fst"]["final_kl"], "rl", pa["rl"]["final_kl"], fmt="{:.5f}"),
    ]
    return out


def study2(sizes: Sizes, runs_dir: Path) -> dict:
    specs = study2_specs(sizes)
    runs = {spec.name: run_summary(spec, ensure_run(spec, runs_dir), sizes) for spec in specs}
    tasks = [name for name, _ in sizes.study2_schedule]
    ends, total = [], 0
    for name, steps in sizes.study2_schedule:
        total += steps
        ends.append((name, total))
    for r in runs.values():  # accuracy of every task at the end of every stage (eval steps = stage ends)
        r["at_stage_end"] = {stage: {t: _at(r["curves"][t], step) for t in tasks} for stage, step in ends}
        r["kl_at_stage_end"] = {stage: _mean([_at(r["curves"][t], step, "kl") for t in tasks]) for stage, step in ends}
        r["forgetting"] = {t: _minus(r["at_stage_end"][t][t], r["at_stage_end"][ends[-1][0]][t]) for t in tasks[:-1]}
    arms = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in ("rl", "fst")}
    findings = []
    for i, (stage, _) in enumerate(ends):
        findings.append(judge(f"accuracy on {stage} at the end of its stage", "fst",
                              [r["at_stage_end"][stage][stage] for r in arms["fst"]], "rl",
                              [r["at_stage_end"][stage][stage] for r in arms["rl"]]))
        if i < len(ends) - 1:
            findings.append(judge(f"forgetting of {stage} by the end (accuracy at its stage end minus at the end)",
                                  "fst", [r["forgetting"][stage] for r in arms["fst"]], "rl",
                                  [r["forgetting"][stage] for r in arms["rl"]]))
    findings.append(judge("KL(trained || base) at the end, mean over tasks", "fst",
                          [r["kl_at_stage_end"][ends[-1][0]] for r in arms["fst"]], "rl",
                          [r["kl_at_stage_end"][ends[-1][0]] for r in arms["rl"]], fmt="{:.5f}"))
    return {"schedule": [list(s) for s in sizes.study2_schedule], "seeds": list(sizes.study2_seeds),
            "seed_prompt": rewards.TASK_AGNOSTIC_PROMPT, "eval_every": sizes.eval_every, "eval_n": sizes.eval_n,
            "eval_k": sizes.eval_k, "kl_n": sizes.kl_n, "stage_ends": ends, "runs": runs, "findings": findings}


def study3(sizes: Sizes, runs_dir: Path) -> dict:
    for spec in study1_specs(sizes):  # the checkpoints it starts from
        if spec.arm != "gepa":
            ensure_run(spec, runs_dir)
    specs = study3_specs(sizes, runs_dir)
    runs = {spec.name: run_summary(spec, ensure_run(spec, runs_dir), sizes) for spec in specs}
    task = STUDY3_TASK
    arms = {arm: [r for r in runs.values() if r["arm"] == arm] for arm in ("from-base", "from-rl", "from-fst")}
    curves = {arm: [r["curves"][task] for r in rs] for arm, rs in arms.items()}
    final = {arm: [c[-1]["accuracy"] for c in cs] for arm, cs in curves.items()}
    start = {arm: [c[0]["accuracy"] for c in cs] for arm, cs in curves.items()}
    gain = {arm: [f - s for f, s in zip(final[arm], start[arm])] for arm in arms}
    findings = []
    for arm in ("from-rl", "from-fst"):
        findings.append(judge(f"final accuracy on {task}", arm, final[arm], "from-base", final["from-base"]))
        findings.append(judge(f"gain on {task} (final minus start)", arm, gain[arm], "from-base", gain["from-base"]))
    findings.append(judge(f"final accuracy on {task}", "from-fst", final["from-fst"], "from-rl", final["from-rl"]))
    return {"task": task, "steps": sizes.study3_steps, "seeds": list(sizes.seeds), "eval_every": sizes.eval_every,
            "eval_n": sizes.eval_n, "eval_k": sizes.eval_k, "starts_from": {"from-rl": "s1-rl-seed<seed>",
                                                                          "from-fst": "s1-fst-seed<seed>"},
            "runs": runs, "mean_curves": {arm: mean_curve(c) for arm, c in curves.items()},
            "per_arm": {arm: {"start_accuracy": start[arm], "final_accuracy": final[arm], "gain": gain[arm],
                              "final_kl": [c[-1]["kl"] for c in curves[arm]]} for arm in arms},
            "findings": findings}


def _at_seed(curve, step):
    return _at(curve, step, "accuracy_seed_prompt")


def _at(curve, step, key="accuracy"):
    return next((p[key] for p in curve if p["step"] == step), None)


def _minus(a, b):
    return None if a is None or b is None else a - b


# ---------------------------------------------------------------------------------------------
# Plots and the README.

def plot_study1(s: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"rl": "tab:blue", "fst": "tab:red", "gepa": "tab:green"}
    task = s["task"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, x, label in ((axes[0], "step", "RL steps"), (axes[1], "rollouts_all", "all rollouts (RL + fast loop)")):
        for arm, colour in colours.items():
            for r in (r for r in s["runs"].values() if r["arm"] == arm):
                c = r["curves"][task]
                ax.plot([p[x] for p in c], [p["accuracy"] for p in c], color=colour, lw=0.8, alpha=0.45)
            m = s["mean_curves"][arm]
            ax.plot([p[x] for p in m], [p["accuracy"] for p in m], color=colour, lw=2.2, marker="o", ms=4,
                    label=f"{arm} (mean of {len([r for r in s['runs'].values() if r['arm'] == arm])})")
            if arm != "rl" and x == "step":  # the same weights with the seed prompt: what the evolved prompt adds
                seed_prompt = [_mean([_at_seed(r["curves"][task], p["step"]) for r in s["runs"].values()
                                      if r["arm"] == arm]) for p in m]
                ax.plot([p["step"] for p in m], seed_prompt, color=colour, lw=1.2, ls="--",
                        label=f"{arm}, seed prompt instead of the evolved one")
        ax.axhline(s["rl_best_mean_accuracy"], color="grey", ls="--", lw=1, label="rl's best mean")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation accuracy ({task}, reward = 1)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Study 1: accuracy on fixed held-out problems; thin lines are seeds")
    files = [_save(fig, out / "study1_accuracy.png")]

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm, colour in colours.items():
        for r in (r for r in s["runs"].values() if r["arm"] == arm):
            c = r["curves"][task]
            ax.plot([p["accuracy"] for p in c], [p["kl"] for p in c], color=colour, lw=0.8, alpha=0.45, marker=".")
        m = s["mean_curves"][arm]
        ax.plot([p["accuracy"] for p in m], [p["kl"] for p in m], color=colour, lw=2.2, marker="o", ms=4, label=arm)
    ax.axvline(s["matched_accuracy"], color="grey", ls="--", lw=1, label="matched accuracy")
    ax.set_xlabel("validation accuracy")
    ax.set_ylabel("exact KL(trained || base) per token")
    ax.set_title("Study 1: drift against accuracy, per checkpoint")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "study1_kl_vs_accuracy.png"))
    return files


def plot_study2(s: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"rl": "tab:blue", "fst": "tab:red"}
    tasks = [t for t, _ in s["schedule"]]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in s["runs"].values():
            c = r["curves"][task]
            ax.plot([p["step"] for p in c], [p["accuracy"] for p in c], color=colours[r["arm"]], marker="o", ms=3,
                    label=f"{r['arm']} seed {r['seed']}")
        ax.set_title(f"validation accuracy on {task}")
        ax.set_xlabel("step")
    kl_ax = axes[0][-1]
    for r in s["runs"].values():
        steps = [p["step"] for p in r["curves"][tasks[0]]]
        kl = [_mean([_at(r["curves"][t], st, "kl") for t in tasks]) for st in steps]
        kl_ax.plot(steps, kl, color=colours[r["arm"]], marker="o", ms=3, label=f"{r['arm']} seed {r['seed']}")
    kl_ax.set_title("KL(trained || base), mean over tasks")
    kl_ax.set_xlabel("step")
    for ax in axes[0]:
        for _, end in s["stage_ends"][:-1]:
            ax.axvline(end, color="grey", ls="--", lw=1)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Study 2: one run over " + " -> ".join(tasks) + " (dashed: task switches)")
    return [_save(fig, out / "study2_continual.png")]


def plot_study3(s: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"from-base": "tab:grey", "from-rl": "tab:blue", "from-fst": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm, colour in colours.items():
        for r in (r for r in s["runs"].values() if r["arm"] == arm):
            c = r["curves"][s["task"]]
            ax.plot([p["step"] for p in c], [p["accuracy"] for p in c], color=colour, lw=0.8, alpha=0.45)
        m = s["mean_curves"][arm]
        ax.plot([p["step"] for p in m], [p["accuracy"] for p in m], color=colour, lw=2.2, marker="o", ms=4, label=arm)
    ax.set_xlabel("RL steps on the new task")
    ax.set_ylabel(f"validation accuracy ({s['task']})")
    ax.set_title("Study 3: fresh RL from three starting points")
    ax.legend(fontsize=8)
    return [_save(fig, out / "study3_plasticity.png")]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def readme(summary: dict) -> str:
    st = summary["settings"]
    lines = ["# FST against RL in miniature", "",
             "Made by `experiments/miniature.py` (the numbers below are generated from `summary.json`; do not "
             "edit by hand). " + ("**--quick run on a tiny random model: the numbers mean nothing.**"
                                  if st["quick"] else f"Model: {st['model']}, base config `{BASE_CONFIG}`."), "",
             "Accuracy = the share of validation samples that are fully right (reward 1), on fixed held-out "
             "problems with the same sampling draws at every validation. Mean reward, which counts the 0.1 "
             "format credit, is in summary.json as `mean_reward`. A difference no larger than the spread "
             "between seeds is called *no difference at this scale*.", ""]
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
    if "1" in studies:
        lines += _readme_study1(studies["1"])
    if "2" in studies:
        lines += _readme_study2(studies["2"])
    if "3" in studies:
        lines += _readme_study3(studies["3"])
    return "\n".join(lines) + "\n"


def _header(s: dict, title: str) -> list[str]:
    return [f"## {title}", "", f"Command: `{s['command']}`  ", f"Measured wall time: {_duration(s['wall_seconds'])} "
            f"(training {_duration(s['seconds_training'])}, measurements after training "
            f"{_duration(s['seconds_measuring'])}; threads {s['threads']}). Runs: `{s['runs_dir']}`.", ""]


def _readme_study1(s: dict) -> list[str]:
    pa, reach = s["per_arm"], s["steps_to_rl_best"]
    lines = _header(s, "Study 1: sample efficiency and drift") + [
        f"Task `{s['task']}`, {s['steps']} steps, seeds {s['seeds']} (gepa: the first), validation every "
        f"{s['eval_every']} steps on {s['eval_n']} problems x {s['eval_k']} samples.", "",
        "![accuracy](study1_accuracy.png)", "",
        "| arm | seeds | final accuracy (per seed) | best accuracy | steps to rl's best mean | "
        "rollouts to it | final KL | rollouts RL + fast | training time / run |",
        "|---|---|---|---|---|---|---|---|---|"]
    for arm in ("rl", "fst", "gepa"):
        p = pa[arm]
        lines.append(f"| {arm} | {len(p['final_accuracy'])} | {', '.join(_f(v) for v in p['final_accuracy'])} | "
                     f"{', '.join(_f(v) for v in p['best_accuracy'])} | {_f(reach[arm]['step'], '{}')} "
                     f"(rl / this: {_f(reach[arm]['rl_steps_over_these'], '{:.2f}x')}) | "
                     f"{_f(reach[arm]['rollouts_all'], '{:.0f}')} | "
                     f"{', '.join(_f(v, '{:.5f}') for v in p['final_kl'])} | "
                     f"{_f(_mean(p['rollouts_rl']), '{:.0f}')} + {_f(_mean(p['rollouts_fast']), '{:.0f}')} | "
                     f"{_duration(_mean(p['seconds_training']) or 0)} |")
    t = s["two_by_two_accuracy_mean"]
    lines += ["", f"rl's best mean validation accuracy: {_f(s['rl_best_mean_accuracy'])}. \"Steps to rl's best mean\" "
              "is the first validation step at which an arm's mean curve reaches it.", "",
              "![KL against accuracy](study1_kl_vs_accuracy.png)", "",
              f"Matched accuracy = {_f(s['matched_accuracy'])}, the highest accuracy both the rl and the fst mean "
              "curves reach; each arm's KL there is read off its mean curve where it first reaches that accuracy "
              "(linear between the two validation points around the crossing). KL is exact "
              "(eval.kl_to_base, full vocabulary), with the prompt deployed at that checkpoint, on "
              f"{s['kl_n']} held-out problems; gepa never updates the weights, so its KL is 0. "
              "KL at matched accuracy: fst "
              f"{_f(s['kl_at_matched_accuracy']['fst']['mean_curve'], '{:.5f}')}, rl "
              f"{_f(s['kl_at_matched_accuracy']['rl']['mean_curve'], '{:.5f}')}: fst's KL is "
              f"{_f(s['fst_kl_fraction_of_rl'], '{:.2f}')} of rl's.", "",
              f"2x2 at the end of fst (eval.two_by_two; accuracy, mean over {len(pa['fst']['final_accuracy'])} "
              f"seeds; the validation problems and sampling seed: base + seed is the step-0 validation, "
              "trained + seed and trained + evolved the last one, base + evolved measured after training):", "",
              "| weights \\ prompt | seed | evolved |", "|---|---|---|",
              f"| base | {_f(t['base']['seed'])} | {_f(t['base']['evolved'])} |",
              f"| trained | {_f(t['trained']['seed'])} | {_f(t['trained']['evolved'])} |", "",
              "What the numbers say:", ""] + [f"- {f}" for f in s["findings"]] + [""]
    return lines


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
    lines += ["", "Forgetting = accuracy on a task at the end of its own stage minus at the end of the run:", "",
              "| run | " + " | ".join(tasks[:-1]) + " |", "|---|" + "---|" * (len(tasks) - 1)]
    for name, r in s["runs"].items():
        lines.append(f"| {name} | " + " | ".join(_f(r["forgetting"][t], "{:+.3f}") for t in tasks[:-1]) + " |")
    lines += ["", "What the numbers say:", ""] + [f"- {f}" for f in s["findings"]] + [""]
    return lines


def _readme_study3(s: dict) -> list[str]:
    lines = _header(s, "Study 3: plasticity") + [
        f"Fresh rl on `{s['task']}` for {s['steps']} steps, seeds {s['seeds']}, from the base model, from study 1's "
        "rl run of the same seed and from study 1's fst run of the same seed (`init_from`, new optimiser, "
        "the task's own seed prompt).", "", "![plasticity](study3_plasticity.png)", "",
        "| start | accuracy at step 0 (per seed) | final accuracy | gain | final KL |", "|---|---|---|---|---|"]
    for arm, p in s["per_arm"].items():
        lines.append(f"| {arm} | {', '.join(_f(v) for v in p['start_accuracy'])} | "
                     f"{', '.join(_f(v) for v in p['final_accuracy'])} | "
                     f"{', '.join(_f(v, '{:+.3f}') for v in p['gain'])} | "
                     f"{', '.join(_f(v, '{:.5f}') for v in p['final_kl'])} |")
    lines += ["", "What the numbers say:", ""] + [f"- {f}" for f in s["findings"]] + [""]
    return lines


# ---------------------------------------------------------------------------------------------
# Estimates, the tiny model for --quick, and the command line.

def estimate_seconds(study: str, sizes: Sizes) -> float:
    """Expected wall time of a study from the COST_* constants (2 quiet cores)."""
    fast_every = fst.load_config(str(ROOT / BASE_CONFIG), sizes.extra).fast.every
    def run_cost(mode: str, steps: int, n_tasks: int = 1) -> float:
        evals = steps // sizes.eval_every + 1
        prompts = 1 if mode == "rl" else 2
        t = steps * (COST_GEPA_STEP if mode == "gepa" else COST_RL_STEP) + COST_MODEL_LOAD
        t += (steps // fast_every) * COST_FAST_ROUND if mode != "rl" else 0
        t += evals * n_tasks * prompts * sizes.eval_n * sizes.eval_k * COST_EVAL_SAMPLE
        if mode != "gepa":  # (init_from runs measure step 0 too: one more, left out of the estimate)
            t += (evals - 1) * (COST_MODEL_LOAD + n_tasks * sizes.kl_n * COST_KL_PROBLEM)
        return t
    two_by_two = COST_MODEL_LOAD + sizes.eval_n * sizes.eval_k * COST_EVAL_SAMPLE
    if study == "1":
        n = len(sizes.seeds)
        return n * (run_cost("rl", sizes.study1_steps) + run_cost("fst", sizes.study1_steps) + two_by_two) + \
            run_cost("gepa", sizes.study1_steps)
    if study == "2":
        steps, n_tasks = sum(s for _, s in sizes.study2_schedule), len(sizes.study2_schedule)
        return len(sizes.study2_seeds) * (run_cost("rl", steps, n_tasks) + run_cost("fst", steps, n_tasks))
    return 3 * len(sizes.seeds) * run_cost("rl", sizes.study3_steps)


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


STUDIES = {"1": study1, "2": study2, "3": study3}
PLOTS = {"1": plot_study1, "2": plot_study2, "3": plot_study3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=["1", "2", "3", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny random model, a handful of steps (~1 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, help="results folder (default results/miniature, or "
                                              "runs/miniature-quick/results with --quick)")
    ap.add_argument("--runs-dir", type=Path, help="scratch run folders (default runs/miniature, "
                                                  "runs/miniature-quick with --quick)")
    ap.add_argument("--study1-arms", nargs="+", choices=["rl", "fst", "gepa"], default=["rl", "fst", "gepa"],
                    help="study 1's arms (default all three; the others are reported as not run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs_dir = (args.runs_dir or ROOT / "runs" / ("miniature-quick" if args.quick else "miniature")).resolve()
    out = (args.out or (runs_dir / "results" if args.quick else ROOT / "results" / "miniature")).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.quick(build_tiny_model(runs_dir / "tiny-model")) if args.quick else Sizes()
    sizes.study1_arms = tuple(args.study1_arms)
    check_sizes(sizes)
    chosen = ["1", "2", "3"] if args.study == "all" else [args.study]
    command = "python experiments/miniature.py " + " ".join(_quote(a) for a in (sys.argv[1:] if argv is None else argv))

    estimates = {s: None if args.quick else estimate_seconds(s, sizes) for s in chosen}
    for s in chosen:
        if estimates[s] is not None:
            print(f"[miniature] study {s}: expected about {_duration(estimates[s])} on 2 quiet cores "
                  "(runs already finished are skipped)", file=sys.stderr)

    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"studies": {}}
    if summary.get("settings", {}).get("quick", args.quick) != args.quick:
        summary = {"studies": {}}  # never mix quick and real numbers in one summary
    base_file = ROOT / "results" / "miniature" / "base_accuracy.json"
    model_name = sizes.model or fst.load_config(str(ROOT / BASE_CONFIG)).model.name
    summary["settings"] = {"quick": args.quick, "model": model_name,
                           "base_config": BASE_CONFIG, "sizes": {k: v for k, v in vars(sizes).items()
                                                                 if k not in ("model", "extra")}}
    if base_file.exists() and not args.quick:
        summary["base_accuracy"] = json.loads(base_file.read_text())
    done = []  # the studies this invocation has finished
    for s in chosen:
        commands_file = runs_dir / f"study{s}_commands.json"
        commands = json.loads(commands_file.read_text()) if commands_file.exists() else []
        commands_file.write_text(json.dumps(list(dict.fromkeys(commands + [command])), indent=1))
        result = STUDIES[s](sizes, runs_dir)
        train_s = sum(r["seconds_training"] for r in result["runs"].values())
        measure_s = sum(r["seconds_measuring"] for r in result["runs"].values())
        # Wall time = the seconds of this study's own runs and their measurements, over every
        # invocation that worked on them (a resumed run counts the steps it redid).
        result |= {"command": command, "all_commands": json.loads(commands_file.read_text()),
                   "threads": args.threads, "runs_dir": str(runs_dir), "wall_seconds": round(train_s + measure_s, 1),
                   "seconds_training": round(train_s, 1), "seconds_measuring": round(measure_s, 1),
                   "expected_seconds": estimates[s] and round(estimates[s])}
        result["plots"] = PLOTS[s](result, out)
        on_disk = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        if on_disk.get("settings", {}).get("quick") == args.quick:  # another study's invocation may have
            summary["studies"] = on_disk["studies"] | {k: summary["studies"][k] for k in done}  # written meanwhile
        done.append(s)
        summary["studies"][s] = result
        summary_file.write_text(portable(json.dumps(summary, indent=1), runs_dir))
        (out / "README.md").write_text(portable(readme(summary), runs_dir))
        print(f"[miniature] study {s}: {_duration(result['wall_seconds'])} of runs and measurements "
              f"(expected {_duration(estimates[s] or 0)}); wrote {out}", file=sys.stderr)
        for line in result["findings"]:
            print(f"  - {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
