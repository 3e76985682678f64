"""experiments/study4.py -- study 4 of the miniature: where RL cannot start (issue 41).

The paper's break-out from near-zero reward, in miniature: rl against fst from a start where the base
model is right a few percent of the time with binary reward (`add` with its worked example in the
system text, format credit 0: results/miniature/floor_probe.json), validated every few steps so that
the step at which a run leaves the floor resolves. The measure is fixed before the runs (THRESHOLD,
and a seed that never reaches it counts as reaching it one validation interval after its last step);
reported paired by seed: RL steps and all rollouts to the threshold, final accuracy, KL at the end and
at matched accuracy, the 2x2 table, and the fast-loop child deployed when fst first reached the
threshold (its operator, lineage and text, from the record's pool files).

It plugs into experiments/miniature.py (`--study 4`) through the registries it fills at the end of
this file (run specs, the study's numbers, its plot and README section); runs, records and statistics
are the other studies' (study_runs, study_stats).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import study_report  # noqa: I001 -- after study_runs has put the repository on sys.path (miniature imports it first)
import studies
from study_runs import ARMS, REPORT_FORMAT, ROOT, SPECS, Places, RunSpec, Sizes, common_overrides, \
    fast_loop_summary, gather, run_summary
from study_stats import _f, _mean, _ms, by_seed, compare, describe, first_reach, kl_at_accuracy, mean_curve, \
    seed_matched_levels
import pool  # noqa: E402
import rewards  # noqa: E402

# ---------------------------------------------------------------------------------------------
# What study 4 runs. Changing a size after runs were recorded makes the script refuse those records.
TASK = "add"
# The worked example in the system text instead of a chat turn, and no format credit: the base model is
# right 4.7% of the time (floor_probe.json; 17% with the example as a turn, 0% without any example).
TASK_OPTIONS = {"example_in": "system", "format_reward": 0.0}
# Sizes below study 1's (18 steps, 24 x 4 validation, 12 KL problems): 10 runs had to fit two hours on two
# CPU cores shared with other jobs.
STEPS = 12
EVAL_EVERY = 3            # validation (and checkpoint) every 3 steps: steps to the threshold resolve to 3
EVAL_N, EVAL_K = 12, 4    # held-out problems x samples per validation (48 samples: resolution 0.021)
KL_N = 6                  # held-out problems for the exact KL per checkpoint
FAST_EVERY = 4            # fast rounds after steps 4, 8 and 12: the first one early, three in the run
# Fixed before the runs: held-out accuracy 0.2 is four times the start and above the 17% one worked-example
# chat turn gives the base model, so reaching it means learning, not only picking up the answer format.
THRESHOLD = 0.2
QUICK = dict(steps=4, eval_every=2, eval_n=2, eval_k=2, kl_n=2, fast_every=2)   # --quick: the tiny random model
ARMS4 = ("rl", "fst")
FLOOR_PROBE = ROOT / "results" / "miniature" / "floor_probe.json"   # how the start was chosen (task_probe.py)


@dataclasses.dataclass
class Plan:
    """Study 4's sizes (QUICK's with --quick)."""
    steps: int = STEPS
    eval_every: int = EVAL_EVERY
    eval_n: int = EVAL_N
    eval_k: int = EVAL_K
    kl_n: int = KL_N
    fast_every: int = FAST_EVERY

    @property
    def censored_at(self) -> int:
        """Where a seed that never reaches the threshold counts: one validation interval after the last step."""
        return self.steps + self.eval_every


def plan(sizes: Sizes) -> Plan:
    return Plan(**QUICK) if sizes.study4_quick else Plan()


def study4_specs(sizes: Sizes, arms=None) -> list[RunSpec]:
    p = plan(sizes)
    validation = dataclasses.replace(sizes, eval_every=p.eval_every, eval_n=p.eval_n, eval_k=p.eval_k)
    options = ", ".join(f"{k}: {v}" for k, v in TASK_OPTIONS.items())
    specs = []
    for arm in arms or sizes.study4_arms:
        for seed in sizes.study4_seeds:
            specs.append(RunSpec("4", arm, seed, p.steps, common_overrides(validation, seed) + ARMS[arm] + [
                f"task.name={TASK}", "task.system_prompt=''", f"task.options={{{options}}}",
                f"train.steps={p.steps}", f"fast.every={p.fast_every}"],
                [TASK], sizes.dtype, arm, two_by_two=arm == "fst"))
    return specs


# ---------------------------------------------------------------------------------------------
# The numbers.

def to_threshold(curve: list[dict], p: Plan, x: str = "step") -> tuple[float, bool]:
    """(x where the curve first reaches THRESHOLD, True) or, never reached, (x censored one validation
    interval past the end, False): RL steps at censored_at; rollouts at the last count plus the rollouts of
    the run's last validation interval (its own rate)."""
    reached = first_reach(curve, THRESHOLD, x)
    if reached is not None:
        return reached, True
    if x == "step":
        return p.censored_at, False
    return curve[-1][x] + (curve[-1][x] - curve[-2][x] if len(curve) > 1 else 0), False


def deployed_at(record: Path, step: int):
    """The pool member fst deployed at validation step `step` (the best of the last pool saved before it:
    pool/step_<i>.json is the pool after step index i's fast round); None before the first round."""
    files = [f for f in sorted((record / "pool").glob("step_*.json")) if int(f.stem.removeprefix("step_")) < step]
    return pool.PromptPool.load(files[-1]).best() if files else None


def children_used(record: Path, curve: list[dict]) -> dict:
    """Where fst's children reached the policy: the validation steps at which a child was the pool's best
    (deployed), and the fast rounds (step index) after which RL sampled with a child (in the pool's top K)."""
    sampled = [int(f.stem.removeprefix("step_")) for f in sorted((record / "pool").glob("step_*.json"))
               if any(m.operator != "seed" and m.in_top_k for m in pool.PromptPool.load(f))]
    return {"deployed_at": [q["step"] for q in curve if (best := deployed_at(record, q["step"])) and
                            best.operator != "seed"], "sampled_after_round": sampled}


def first_lift(record: Path, curve: list[dict]) -> dict | None:
    """The context fst deployed at its first validation at or above THRESHOLD: the best of the last pool
    saved before that step (pool/step_<s-1>.json is the pool after step s-1's fast round), its operator,
    lineage and text; None when the run never got there. At the seed prompt the weights lifted it."""
    point = next((q for q in curve if q["accuracy"] >= THRESHOLD - 1e-12), None)
    if point is None:
        return None
    best = deployed_at(record, point["step"])
    out = {"step": point["step"], "accuracy": point["accuracy"], "accuracy_seed_prompt": point["accuracy_seed_prompt"]}
    if best is None or best.operator == "seed":
        return out | {"operator": "seed", "lineage": ["seed"], "instruction": None, "demos": []}
    return out | {"operator": best.operator, "lineage": pool.lineage(record, best.id), "born": best.born_step,
                  "instruction": best.text, "demos": [list(d) for d in best.demos]}


def arm_runs(runs: dict, arm: str) -> list[dict]:
    """One arm's run summaries in seed order."""
    return sorted((r for r in runs.values() if r["arm"] == arm), key=lambda r: r["seed"])


def per_arm_numbers(runs: dict, p: Plan) -> dict:
    """{arm: {number: [one value per seed]}}, the seeds in per_arm[arm]["seeds"]'s order."""
    out = {}
    for arm in ARMS4:
        rs = arm_runs(runs, arm)
        curves = [r["curves"][TASK] for r in rs]
        steps = [to_threshold(c, p) for c in curves]
        rollouts = [to_threshold(c, p, "rollouts_all") for c in curves]
        out[arm] = {"seeds": [r["seed"] for r in rs], "start_accuracy": [c[0]["accuracy"] for c in curves],
                    "reached": [ok for _, ok in steps], "steps_to_threshold": [s for s, _ in steps],
                    "rollouts_to_threshold": [n for n, _ in rollouts],
                    "final_accuracy": [c[-1]["accuracy"] for c in curves],
                    "best_accuracy": [max(q["accuracy"] for q in c) for c in curves],
                    "final_kl": [c[-1]["kl"] for c in curves],
                    "kl_at_threshold": [kl_at_accuracy(c, THRESHOLD) for c in curves],
                    "rollouts_rl": [r["rollouts_rl"] for r in rs], "rollouts_fast": [r["rollouts_fast"] for r in rs],
                    "seconds_training": [r["seconds_training"] for r in rs]}
    return out


def comparisons4(per_arm: dict, curves: dict) -> list[dict]:
    """fst against rl, paired by seed; the first row is the question of the study."""
    def vs_rl(what, key, **kw):
        return compare(what, "fst", by_seed(per_arm, "fst", key), "rl", by_seed(per_arm, "rl", key), **kw)
    levels = seed_matched_levels(per_arm, curves, "fst")
    kl_matched = {a: {seed: kl_at_accuracy(c, levels[seed]) for seed, c in zip(per_arm[a]["seeds"], curves[a])}
                  for a in ARMS4}
    return [vs_rl(f"RL steps to accuracy {THRESHOLD:g}", "steps_to_threshold", better="lower", fmt="{:.1f}"),
            vs_rl(f"all rollouts (RL + fast) to accuracy {THRESHOLD:g}", "rollouts_to_threshold", better="lower",
                  fmt="{:.0f}"),
            vs_rl("final validation accuracy", "final_accuracy"),
            vs_rl("best validation accuracy", "best_accuracy"),
            vs_rl("final KL(trained || base)", "final_kl", better="lower", fmt="{:.5f}"),
            vs_rl(f"KL at accuracy {THRESHOLD:g}", "kl_at_threshold", better="lower", fmt="{:.5f}"),
            compare("KL at the seed's matched accuracy", "fst", kl_matched["fst"], "rl", kl_matched["rl"],
                    better="lower", fmt="{:.5f}")]


def start_probe() -> dict | None:
    """The candidates' base accuracy with each prompt, and the choice, from FLOOR_PROBE."""
    if not FLOOR_PROBE.exists():
        return None
    probe = json.loads(FLOOR_PROBE.read_text())
    return {"file": FLOOR_PROBE.relative_to(ROOT).as_posix(), "settings": probe["settings"], "chosen": probe["chosen"],
            "accuracy": {task: {prompt: r["accuracy"] for prompt, r in prompts.items()}
                         for task, prompts in probe["tasks"].items()}}


def same_curves(runs: dict) -> dict:
    """{seed: fst's validation accuracies equal rl's at every step}: the seeds where the fast loop changed nothing
    the validation saw (same seed, same problems and sampling draws)."""
    rl = {r["seed"]: [q["accuracy"] for q in r["curves"][TASK]] for r in arm_runs(runs, "rl")}
    return {r["seed"]: [q["accuracy"] for q in r["curves"][TASK]] == rl.get(r["seed"]) for r in arm_runs(runs, "fst")}


def study4(sizes: Sizes, places: Places) -> dict | None:
    """Train what has no record (the arms of --study4-arms), then the study's entry once every arm x seed
    has a record; None while one is missing (another invocation is making it)."""
    p = plan(sizes)
    measured = dataclasses.replace(sizes, kl_n=p.kl_n)  # what obtain() measures after training
    gather(study4_specs(sizes), measured, places)
    specs = study4_specs(sizes, ARMS4)
    missing = [s.name for s in specs if not (places.records_dir / s.name).is_dir()]
    if missing:
        print(f"[miniature] study 4: no report yet, waiting for the records of {', '.join(missing)}")
        return None
    records = gather(specs, measured, places)
    runs = {s.name: run_summary(s, records[s.name]) for s in specs}
    for s in specs:
        if s.arm == "fst":
            runs[s.name]["fast_loop"] = fast_loop_summary(records[s.name])
            runs[s.name]["first_lift"] = first_lift(records[s.name], runs[s.name]["curves"][TASK])
            runs[s.name]["children_used"] = children_used(records[s.name], runs[s.name]["curves"][TASK])
    per_arm = per_arm_numbers(runs, p)
    curves = {a: [r["curves"][TASK] for r in arm_runs(runs, a)] for a in ARMS4}
    comparisons = comparisons4(per_arm, curves)
    fst_runs = [r for r in runs.values() if r["arm"] == "fst"]
    task = rewards.get_task(TASK, seed=0, **TASK_OPTIONS)
    return {"format": REPORT_FORMAT, "task": TASK, "task_options": TASK_OPTIONS,
            "seed_prompt": task.default_system_prompt, "example": list(task.example), "threshold": THRESHOLD,
            "censored_at": p.censored_at, "steps": p.steps, "seeds": list(sizes.study4_seeds), "arms": list(ARMS4),
            "eval_every": p.eval_every, "eval_n": p.eval_n, "eval_k": p.eval_k, "fast_every": p.fast_every,
            "kl_n": p.kl_n, "runs": runs, "mean_curves": {a: mean_curve(c) for a, c in curves.items()},
            "per_arm": per_arm,
            "per_arm_stats": {a: {k: describe(v) for k, v in n.items() if k not in ("seeds", "reached")}
                              for a, n in per_arm.items()},
            "two_by_two_accuracy_mean": {w: {q: _mean([r["two_by_two"]["accuracy"][w][q] for r in fst_runs])
                                             for q in ("seed", "evolved")} for w in ("base", "trained")},
            "first_lift": {r["seed"]: r["first_lift"] for r in fst_runs},
            "children_used": {r["seed"]: r["children_used"] for r in fst_runs},
            "same_curve_as_rl": same_curves(runs), "start_probe": start_probe(),
            "fast_loop": {"fst": studies.fast_loop_totals(fst_runs)},
            "comparisons": comparisons, "findings": [c["text"] for c in comparisons]}


# ---------------------------------------------------------------------------------------------
# The plot and the README section.

def plot_study4(s: dict, out: Path) -> list[str]:
    """Per seed (one column each, and their mean last): accuracy of both arms against RL steps (top) and
    all rollouts (bottom); fst's weights with the seed prompt dashed; the threshold grey."""
    plt = study_report._pyplot()
    seeds = s["per_arm"]["rl"]["seeds"]
    fig, axes = plt.subplots(2, len(seeds) + 1, figsize=(3.1 * (len(seeds) + 1), 6), squeeze=False, sharey=True)
    for col, seed in enumerate([*seeds, None]):
        for row, (x, label) in enumerate((("step", "RL steps"), ("rollouts_all", "all rollouts (RL + fast)"))):
            ax = axes[row][col]
            for arm in s["arms"]:
                colour = study_report.COLOURS[arm]
                if seed is None:
                    c, title = s["mean_curves"][arm], f"mean of {len(seeds)} seeds"
                else:
                    run = next(r for r in s["runs"].values() if r["arm"] == arm and r["seed"] == seed)
                    c, title = run["curves"][s["task"]], f"seed {seed}"
                ax.plot([q[x] for q in c], [q["accuracy"] for q in c], color=colour, lw=1.8, marker="o", ms=3,
                        label=arm)
                if arm == "fst" and seed is not None and x == "step":
                    ax.plot([q["step"] for q in c], [q["accuracy_seed_prompt"] for q in c], color=colour, lw=1,
                            ls="--", label="fst weights, seed prompt")
            ax.axhline(s["threshold"], color="grey", ls=":", lw=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(label, fontsize=8)
    axes[0][0].set_ylabel(f"validation accuracy ({s['task']})")
    axes[1][0].set_ylabel(f"validation accuracy ({s['task']})")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Study 4: from near-zero reward; dotted: the threshold {s['threshold']:g}")
    return [study_report._save(fig, out / "study4_floor.png")]


def readme_study4(s: dict) -> list[str]:
    pa, st = s["per_arm"], s["per_arm_stats"]
    task_options = ", ".join(f"{k}={v}" for k, v in s["task_options"].items())
    lines = study_report._header(s, "Study 4: where RL cannot start (near-zero reward)") + [
        f"Task `{s['task']}` with options {task_options}: the worked example (\"{s['example'][0]}\") in the system "
        "text after the seed prompt, not as a chat turn, and binary reward; seed prompt \"" + s["seed_prompt"]
        + f"\". {s['steps']} steps, arms {', '.join(s['arms'])} (fst: operators of `configs/tiny.yaml`, "
        f"fast.reuse=none, a fast round every {s['fast_every']} steps), seeds {s['seeds']}, validation every "
        f"{s['eval_every']} steps on {s['eval_n']} problems x {s['eval_k']} samples.", "",
        f"**The measure, fixed before the runs:** the first validation step at which held-out accuracy (the "
        f"deployed prompt: fst's best context, rl's seed prompt) reaches {s['threshold']:g}; a seed that never "
        f"reaches it counts as reaching it at step {s['censored_at']} (the last step plus one validation "
        "interval), and its rollouts at its last count plus those of its last interval. Censored values are "
        "marked `>` below.", "", *start_lines(s), "![per-seed curves](study4_floor.png)", "",
        f"| arm | seeds | accuracy at step 0 | RL steps to {s['threshold']:g} | all rollouts to {s['threshold']:g} | "
        "final accuracy | final KL | rollouts RL + fast | training time / run |", "|---|" + "---|" * 8]
    for arm in s["arms"]:
        p, t = pa[arm], st[arm]

        def mark(values, fmt, reached=p["reached"]):  # per seed, ">" where censored
            return ", ".join(("" if ok else ">") + _f(v, fmt) for v, ok in zip(values, reached))
        lines.append(f"| {arm} | {', '.join(map(str, p['seeds']))} | "
                     f"{study_report._cell(t['start_accuracy'], p['start_accuracy'])} | "
                     f"{_ms(t['steps_to_threshold'], '{:.1f}')} ({mark(p['steps_to_threshold'], '{}')}) | "
                     f"{_ms(t['rollouts_to_threshold'], '{:.0f}')} ({mark(p['rollouts_to_threshold'], '{}')}) | "
                     f"{study_report._cell(t['final_accuracy'], p['final_accuracy'])} | "
                     f"{study_report._cell(t['final_kl'], p['final_kl'], '{:.5f}')} | "
                     f"{_f(_mean(p['rollouts_rl']), '{:.0f}')} + {_f(_mean(p['rollouts_fast']), '{:.0f}')} | "
                     f"{study_report._duration(_mean(p['seconds_training']) or 0)} |")
    lines += ["", "Paired by seed, fst against rl (\"the seed's matched accuracy\": the highest accuracy both "
              "curves of the seed reach):", "", *study_report._comparison_table(s["comparisons"]), "",
              *verdict_lines(s), *two_by_two_lines(s), *first_lift_lines(s), *study_report._fast_loop_lines(s)]
    return lines + [""]


def start_lines(s: dict) -> list[str]:
    """How the start was chosen: the candidates measured by task_probe.py."""
    probe = s.get("start_probe")
    if not probe:
        return []
    st = probe["settings"]
    cells = "; ".join(f"{task} " + ", ".join(f"{_f(a)} ({prompt})" for prompt, a in prompts.items())
                      for task, prompts in probe["accuracy"].items())
    return [f"The start ([`{probe['file']}`]({Path(probe['file']).name}): base model, first {st['n']} test problems x "
            f"{st['k']} samples, T {st['temperature']}, {st['max_new_tokens']} tokens, binary reward): {cells}. "
            f"Chosen: {probe['chosen']['why']}", ""]


def verdict_lines(s: dict) -> list[str]:
    """The study's answer: direction from the first comparison's interval, size against rl's own steps, per seed
    how often fst got there earlier, and what it cost in rollouts (the second comparison)."""
    c, cost = s["comparisons"][0], s["comparisons"][1]
    if c["ci95"] and c["ci95"][1] < 0:
        said = "fst reaches the threshold in fewer RL steps than rl: the break-out reproduces in direction"
    elif c["ci95"] and c["ci95"][0] > 0:
        said = "fst needs more RL steps than rl to reach the threshold: the break-out does not reproduce here"
    else:
        said = "no difference in RL steps to the threshold can be called: the break-out is not shown at this scale"
    ci = f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]" if c["ci95"] else "n/a"
    earlier = sum(d < 0 for d in c["diffs"]), sum(d == 0 for d in c["diffs"]), sum(d > 0 for d in c["diffs"])
    rl_steps = _mean(s["per_arm"]["rl"]["steps_to_threshold"])
    never = {a: s["per_arm"][a]["reached"].count(False) for a in s["arms"]}
    return [f"**Answer:** {said} ({c['what']}: fst - rl = {_f(c['mean_diff'], '{:+.1f}')}, 95% interval {ci} over "
            f"{len(c['seeds'])} seeds; fst earlier in {earlier[0]} seeds, as early in {earlier[1]}, later in "
            f"{earlier[2]}). In size: {_f(abs(c['mean_diff'] or 0), '{:.1f}')} of rl's {_f(rl_steps, '{:.1f}')} "
            f"steps, with {never['rl']} rl and {never['fst']} fst seeds never reaching it; counting the fast "
            f"rounds' rollouts: {cost['verdict']} ({_f(cost['mean_diff'], '{:+.0f}')} rollouts).", ""]


def two_by_two_lines(s: dict) -> list[str]:
    t = s["two_by_two_accuracy_mean"]
    return [f"2x2 at the end of fst (accuracy, mean over {len(s['per_arm']['fst']['seeds'])} seeds; as in study 1):",
            "", "| weights \\ prompt | seed | evolved |", "|---|---|---|",
            f"| base | {_f(t['base']['seed'])} | {_f(t['base']['evolved'])} |",
            f"| trained | {_f(t['trained']['seed'])} | {_f(t['trained']['evolved'])} |", ""]


def first_lift_lines(s: dict) -> list[str]:
    """Per fst seed: the context deployed at its first validation at or above the threshold."""
    same = [str(seed) for seed, equal in s["same_curve_as_rl"].items() if equal]
    lines = ["Where fst's children reached the policy, per seed: the validation steps at which a child was the "
             "pool's best (deployed), and the fast rounds (after step index) whose pool put a child among the "
             "contexts RL samples with (top K): "
             + "; ".join(f"seed {seed}: deployed at {', '.join(map(str, u['deployed_at'])) or 'none'}, sampled by RL "
                         f"after {', '.join(map(str, u['sampled_after_round'])) or 'none'}"
                         for seed, u in s["children_used"].items())
             + f". fst's validation accuracies equal rl's at every step (same seed: same problems and draws) in "
             f"seeds: {', '.join(same) or 'none'}.", "",
             f"What fst deployed at its first validation at or above {s['threshold']:g} (the best context of the "
             "pool saved before that step; \"seed\" = the seed prompt, so the weights lifted it), beside the same "
             "weights with the seed prompt:", ""]
    for seed, lift in s["first_lift"].items():
        if lift is None:
            lines.append(f"- seed {seed}: never reached {s['threshold']:g}.")
            continue
        head = (f"- seed {seed}, step {lift['step']}: accuracy {_f(lift['accuracy'])} (seed prompt on the same "
                f"weights {_f(lift['accuracy_seed_prompt'])}); ")
        if lift["operator"] == "seed":
            lines.append(head + "the seed prompt: the weights lifted it.")
            continue
        demos = "; ".join(f"\"{' '.join(q.split())}\" -> \"{' '.join(a.split())}\"" for q, a in lift["demos"])
        lines.append(head + f"child by `{lift['operator']}` (born at step {lift['born']}, lineage "
                     f"{' > '.join(lift['lineage'])}): instruction \"{' '.join(lift['instruction'][:300].split())}\""
                     + (f", worked examples {demos}" if demos else ", no worked example") + ".")
    return lines


SPECS["4"] = lambda sizes, runs_dir: study4_specs(sizes)
studies.STUDIES["4"] = study4
study_report.PLOTS["4"] = plot_study4
study_report.READMES["4"] = readme_study4
