"""experiments/study_stats.py -- the numbers the miniature studies read off their curves.

Curves averaged over seeds, the step (or rollout count) where a curve first reaches a level, KL at a
matched accuracy, the spread over seeds, and an arm against a reference arm paired by seed with a
bootstrap interval of the mean difference (the verdict follows the interval).
"""
from __future__ import annotations

import math
import statistics

import numpy as np

# Paired bootstrap: resamples of the seeds and a fixed generator, so a report rebuilt from the same
# records prints the same intervals. Below SMALL_N pairs a percentile interval cannot be wider than
# the differences' range, so a verdict from it is called a sign, not a measurement.
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, SMALL_N = 10_000, 0, 5


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


def _at_seed(curve, step):
    return _at(curve, step, "accuracy_seed_prompt")


def _at(curve, step, key="accuracy"):
    return next((p[key] for p in curve if p["step"] == step), None)


def _minus(a, b):
    return None if a is None or b is None else a - b


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)
