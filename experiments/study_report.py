"""experiments/study_report.py -- the miniature's report from the studies' numbers: the plots, the
README (tables and findings) and the study entries of summary.json kept from earlier invocations.
Thin lines in a plot are seeds, thick lines their mean.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from study_runs import BASE_CONFIG, REPORT_FORMAT  # noqa: I001 -- first: it puts the repository on sys.path
from study_stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, SMALL_N, _at, _at_seed, _f, _mean, _ms
import rewards  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Plots and the README: thin lines are seeds, thick lines their mean.

COLOURS = {"rl": "tab:blue", "fst": "tab:red", "gepa": "tab:green", "fst-reuse": "tab:purple",
           "fst-batch": "tab:orange", "fst-batch-1c": "tab:brown", "fst-batch-ev": "tab:olive",
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
    for n, render in READMES.items():
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
              "Paired by seed against rl (and fst-reuse and fst-batch against fst, where both ran):", "",
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
    lines += _fast_loop_lines(s)
    if "against_float32" in s:
        lines += _against_float32_lines(s)
    return lines + [""]


def _fast_loop_lines(s: dict) -> list[str]:
    """Study 1's fast loop per arm: proposals and acceptances by operator, the reflect replies."""
    lines = []
    for arm, f in s.get("fast_loop", {}).items():
        ops = list(f["proposals"])
        seeds = len(s["per_arm"][arm]["seeds"])
        lines += ["", f"Fast loop of {arm} ({f['rounds']} rounds over {seeds} seeds): proposals and "
                  "acceptances by operator; the reflect operator's replies, the share no guard rejected, and its "
                  "rejections by reason.", "",
                  "| | " + " | ".join(ops) + " |", "|---|" + "---|" * len(ops),
                  "| proposals | " + " | ".join(str(f["proposals"][o]) for o in ops) + " |",
                  "| accepted | " + " | ".join(str(f["accepted"].get(o, 0)) for o in ops) + " |", "",
                  f"reflect: {f['reflect_replies']} replies, guard pass rate {_f(f['reflect_guard_pass_rate'], '{:.2f}')}; "
                  "rejected: " + (", ".join(f"{k} {n}" for k, n in f["reflect_rejected"].items() if n) or "none") + "."]
        lines += [f"- reflect child (seed {c['seed']}, born at step {c['born']}): \"{' '.join(c['instruction'][:300].split())}\""
                  for c in f["reflect_children"]]
    return lines


def _against_float32_lines(s: dict) -> list[str]:
    """A bfloat16 study 1 run by run against its float32 twin."""
    lines = ["", f"{s['dtype']} against float32, run by run (the float32 record of the same arm and seed; "
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
PLOTS = {"1": plot_study1, "2": plot_study2, "3": plot_study3}
READMES = {"1": _readme_study1, "2": _readme_study2, "3": _readme_study3}  # study 4 adds its own (study4.py)


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
