"""experiments/studies.py -- the miniature's three studies: their runs' records (made now where
missing), then the numbers each study reports (summary.json's study entry).

Study 1, sample efficiency and drift (rl vs fst vs gepa); study 2, continual learning (forgetting);
study 3, plasticity (fresh rl from the base model, study 1's rl and fst checkpoints).
"""
from __future__ import annotations

import dataclasses

from study_runs import (  # noqa: I001 -- first: it puts the repository on sys.path
    DTYPES, REPORT_FORMAT, STUDY1_TASK, STUDY3_TASK, Places, Sizes, gather, recorded_seeds, run_curves,
    run_summary, study1_specs, study2_specs, study3_specs)
from study_stats import (_at, _mean, _minus, by_seed, compare, describe, first_reach, kl_at_accuracy, mean_curve,
                         seed_matched_levels)
import eval as evaluation  # noqa: E402
import rewards  # noqa: E402

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
    per_arm = study1_per_arm(by_arm, curves, target)
    matched = matched_kl(arms, means, curves, target)
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
    comparisons, seed_levels = study1_comparisons(arms, per_arm, curves, matched, target)
    if seed_levels:
        out["seed_matched_accuracy"] = seed_levels
    if {"fst", "fst-reuse"} <= set(arms):  # does training on the fast rounds' rollouts pay? (fast.reuse)
        comparisons += reuse_comparisons(per_arm, curves)
    for arm in (a for a in arms if a.startswith("fst-batch")):  # contexts scored on the RL batch: bought, cost
        comparisons += batch_comparisons(per_arm, curves, [a for a in ("rl", "fst") if a in arms], arm)
    out["comparisons"] = comparisons
    out["findings"] = [c["text"] for c in comparisons]
    if sizes.dtype != "float32":  # a bf16 run must end where its float32 twin does before bf16 is trusted
        finals = {arm: {seed: {"final_accuracy": a, "final_kl": k} for seed, a, k in
                        zip(per_arm[arm]["seeds"], per_arm[arm]["final_accuracy"], per_arm[arm]["final_kl"])}
                  for arm in arms}
        fp32 = float32_finals(sizes, places)
        out["against_float32"] = against_float32(finals, fp32)
        out["comparisons"] += dtype_comparisons(sizes.dtype, finals, fp32)
        out["findings"] = [c["text"] for c in out["comparisons"]]
    out["fast_loop"] = {arm: fast_loop_totals(rs) for arm, rs in by_arm.items() if rs and "fast_loop" in rs[0]}
    return out


def study1_per_arm(by_arm: dict, curves: dict, target: float) -> dict:
    """{arm: {number: [one value per seed]}}, the seeds in per_arm[arm]["seeds"]'s order."""
    return {arm: {"seeds": [r["seed"] for r in rs],
                  "final_accuracy": [c[-1]["accuracy"] for c in curves[arm]],
                  "best_accuracy": [max(p["accuracy"] for p in c) for c in curves[arm]],
                  # the mean over the validations after step 0: sample efficiency in one number
                  "mean_accuracy_during_training": [_mean([p["accuracy"] for p in c[1:]]) for c in curves[arm]],
                  "steps_to_rl_best": [first_reach(c, target) for c in curves[arm]],
                  "final_kl": [c[-1]["kl"] for c in curves[arm]],
                  "seconds_training": [r["seconds_training"] for r in rs],
                  "seconds_measuring": [r["seconds_measuring"] for r in rs],
                  "rollouts_rl": [r["rollouts_rl"] for r in rs],
                  "rollouts_fast": [r["rollouts_fast"] for r in rs],
                  "seconds_steps": [r.get("seconds_steps") for r in rs]}
            for arm, rs in by_arm.items()}


def matched_kl(arms: list, means: dict, curves: dict, target: float) -> dict:
    """Matched accuracy, per arm that trains weights: the highest accuracy both its and rl's mean curves
    reach, and the KL of each arm there (mean curve, and per seed)."""
    matched = {}
    for arm in (a for a in arms if a not in ("rl", "gepa")):
        level = min(target, max(p["accuracy"] for p in means[arm]))
        kl_mean = {a: kl_at_accuracy(means[a], level) for a in (arm, "rl")}
        matched[arm] = {"accuracy": level, "kl_mean_curve": kl_mean,
                        "kl_per_seed": {a: [kl_at_accuracy(c, level) for c in curves[a]] for a in (arm, "rl")},
                        "kl_fraction_of_rl": kl_mean[arm] / kl_mean["rl"]
                        if kl_mean[arm] is not None and kl_mean["rl"] else None}
    return matched


def study1_comparisons(arms: list, per_arm: dict, curves: dict, matched: dict, target: float) -> tuple[list, dict]:
    """Every arm but rl against rl, paired by seed; and {arm: {seed: the seed's matched accuracy}}."""
    comparisons, seed_levels = [], {}
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
        levels = seed_levels[arm] = seed_matched_levels(per_arm, curves, arm)
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
    return comparisons, seed_levels


def reuse_comparisons(per_arm: dict, curves: dict) -> list[dict]:
    """fst-reuse against fst: does training on the fast rounds' rollouts pay (fast.reuse)?"""
    levels = seed_matched_levels(per_arm, curves, "fst-reuse", ref="fst")
    reach_at = {a: {seed: first_reach(c, levels[seed], "rollouts_all")
                    for seed, c in zip(per_arm[a]["seeds"], curves[a]) if seed in levels} for a in ("fst", "fst-reuse")}
    comparisons = [compare("all rollouts (RL + fast) to the accuracy both reach in the seed", "fst-reuse",
                           reach_at["fst-reuse"], "fst", reach_at["fst"], better="lower", fmt="{:.1f}")]
    for what, key in (("final validation accuracy", "final_accuracy"),
                      ("mean validation accuracy over training (after step 0)", "mean_accuracy_during_training")):
        comparisons.append(compare(what, "fst-reuse", by_seed(per_arm, "fst-reuse", key), "fst",
                                   by_seed(per_arm, "fst", key)))
    return comparisons


def batch_comparisons(per_arm: dict, curves: dict, refs: list[str], arm: str = "fst-batch") -> list[dict]:
    """A batch-scoring arm (fst-batch and its variants) against fst (the fast loop scored by rounds of its
    own): rollouts to the accuracy both reach, final and mean accuracy; and the training steps' seconds per
    run as a ratio to each of `refs` (1.00 = the same time; records made in different sessions share only
    the machine kind and thread count)."""
    comparisons = []
    if "fst" in refs:
        levels = seed_matched_levels(per_arm, curves, arm, ref="fst")
        reach_at = {a: {seed: first_reach(c, levels[seed], "rollouts_all")
                        for seed, c in zip(per_arm[a]["seeds"], curves[a]) if seed in levels} for a in ("fst", arm)}
        comparisons.append(compare("all rollouts (RL + fast) to the accuracy both reach in the seed", arm,
                                   reach_at[arm], "fst", reach_at["fst"], better="lower", fmt="{:.1f}"))
        for what, key in (("final validation accuracy", "final_accuracy"),
                          ("mean validation accuracy over training (after step 0)", "mean_accuracy_during_training")):
            comparisons.append(compare(what, arm, by_seed(per_arm, arm, key), "fst", by_seed(per_arm, "fst", key)))
    mine = by_seed(per_arm, arm, "seconds_steps")
    for ref in refs:
        theirs = by_seed(per_arm, ref, "seconds_steps")
        ratio = {seed: mine[seed] / theirs[seed] for seed in mine if mine[seed] and theirs.get(seed)}
        comparisons.append(compare(f"training-step seconds per run as a ratio to {ref}'s (1.00 = the same)",
                                   arm, ratio, ref, {seed: 1.0 for seed in ratio}, better="lower", fmt="{:.2f}"))
    return comparisons


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


def dtype_comparisons(dtype: str, finals: dict, fp32: dict) -> list[dict]:
    """Each arm's final accuracy and KL in `dtype` against its float32 records, paired by seed (the seeds
    both have), with the bootstrap interval: does this dtype learn like float32?"""
    out = []
    for arm, seeds in finals.items():
        twins = {s: fp32[arm][s] for s in seeds if s in fp32.get(arm, {})}
        for what, key, better, fmt in (("final validation accuracy", "final_accuracy", "higher", "{:.3f}"),
                                       ("final KL to base", "final_kl", "lower", "{:.4f}")):
            out.append(compare(f"{what}, {arm}", f"{dtype}", {s: v[key] for s, v in seeds.items() if s in twins},
                               "float32", {s: v[key] for s, v in twins.items()}, better=better, fmt=fmt))
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


STUDIES = {"1": study1, "2": study2, "3": study3}
