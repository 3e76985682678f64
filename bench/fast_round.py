"""bench/fast_round.py -- one job: time one fast round of the tiny config, one proposal at a time vs in waves.

    python bench/fast_round.py --threads 2              # fast.wave=1 vs the config's wave, 2 pairs, 12 proposals
    python bench/fast_round.py --proposals 0            # the config's budget as it is (proposals may differ)
    python bench/fast_round.py --threads 1 --before     # + a third side: the fast loop before waves
    python bench/fast_round.py --demos 3 --unshared     # 3-demo contexts; + a side without prefix sharing

The round is fst's own: `python fst.py --config tiny.yaml --set mode=fst` (SmolLM2-135M, arithmetic,
12 anchors, budget 5x, reflect + demo) run through fst.main. A prep process runs RL steps 0-4 once and
checkpoints; every timed side resumes a copy of that run (same seed, same adapter, same demo buffer,
same anchors) for step 5, whose fast round is the one measured, so both sides start from identical
state. Both sides make the same number of proposals: --proposals N (default 12, three waves of 4) sets
fast.max_proposals=N and a budget too large to end the round first (fast.budget=100), so the time
ratio compares equal work. --proposals 0 keeps the config's budget, which a wave spends differently
(it reserves budget for children that may then fail the guards), so proposals usually differ.
Sides alternate (sequential, wave, then wave, sequential, ...), each in its own process.
--before adds the round as it was before waves: one at a time, free-form reflector replies, parents
judged on their anchor rollouts (BEFORE_WAVES); it does different work, so it gets no time ratio.
--demos N gives every pool member of the prep run's checkpoint N gold worked examples (train problems
solved by the task's own computation, as turns), so the timed step and its round prompt with long
contexts, as a pool does once the demo operators have filled it. --unshared adds a side that runs the
wave side's round with prefix sharing off (rollout.MIN_SHARED_PREFIX = sys.maxsize in its process): the
round before and after contexts were prefilled once per sample call; wave / unshared is its time ratio
(printed when both sides made the same number of proposals).

Per side: seconds of the round (the "fast" line of metrics.jsonl), proposals, acceptances, rollouts,
where the time went, and the round's cost in RL steps = round seconds / median RL-step seconds of the
same run (steps 0-5, the fast round excluded). The ratio wave / sequential is printed per pair when both
sides made the same number of proposals; otherwise only seconds per proposal are compared, and the
table says so. The reflector's replies are recorded (a wrapper around context_opt.make_reflector's
reflect) so the JSON shows what it wrote. JSON goes to bench/out/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RL_STEPS_BEFORE = 5          # steps 0-4 in the prep run; step 5 (+ its fast round, fast.every=6) is timed
SHOWN_REPLIES = 8            # reflector replies kept per side in the JSON
BEFORE_WAVES = ["fast.wave=1", "fast.reflector_format=free", "fast.rescore_parent=false"]


def child_main(a) -> None:
    """In its own process: run fst (prep: steps 0-4; side: resume for step 5 and its fast round)."""
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    import context_opt
    import fst
    import rollout
    if a.no_prefix_sharing:
        rollout.MIN_SHARED_PREFIX = sys.maxsize  # every prompt prefilled in full, as before prefix sharing

    replies = []
    real = context_opt.make_reflector

    def recording_reflector(*args, **kwargs):
        reflect = real(*args, **kwargs)

        def recorded(prompts):
            out = reflect(prompts)
            replies.extend({"text": r.text, "tokens": r.tokens, "prompt": context_opt.extract_prompt(r.text)}
                           for r in out)
            return out
        return recorded

    context_opt.make_reflector = recording_reflector     # records what fst's own reflector wrote
    run_dir = Path(a.run_dir)
    if a.child == "prep":
        fst.main(["--config", a.config, "--set", "mode=fst", "--set", f"train.steps={RL_STEPS_BEFORE}",
                  "--set", f"train.save_every={RL_STEPS_BEFORE}", "--set", "eval.every=0",
                  "--set", f"out_dir={run_dir.parent}", "--set", f"run_name={run_dir.name}",
                  *[x for s in a.common for x in ("--set", s)]])
        if a.demos:
            give_demos(fst, run_dir, a.demos)
        return
    fst.main(["--resume", str(run_dir), "--set", f"train.steps={RL_STEPS_BEFORE + 1}",
              *[x for s in a.side_set for x in ("--set", s)]])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fast = [r for r in rows if r["kind"] == "fast"][-1]
    rl = [r["seconds_step"] - r["seconds_fast"] for r in rows if r["kind"] == "train"]
    Path(a.result).write_text(json.dumps({"fast": fast, "rl_step_seconds": rl, "replies": replies}))


def give_demos(fst, run_dir: Path, n: int) -> None:
    """Every pool member in the prep run's last checkpoint gets n gold worked examples (distinct train
    problems, bench/prefix_sharing.gold_demo), which the resumed sides then load with the pool."""
    from plumbing import checkpoints
    import rewards
    from pool import PromptPool
    from prefix_sharing import gold_demo
    cfg = fst.load_config(str(run_dir / "config.yaml"))
    if n > cfg.fast.max_demos:
        raise SystemExit(f"--demos {n} exceeds fast.max_demos={cfg.fast.max_demos}")
    ckpt = checkpoints.latest_checkpoint(run_dir)
    pool = PromptPool.load(ckpt / "pool.json")
    problems = iter(random.Random(0).sample(rewards.make_task(cfg.task).load("train"), n * len(pool)))
    for prompt in pool:
        prompt.demos = [list(gold_demo(next(problems))) for _ in range(n)]
    pool.save(ckpt / "pool.json")


def run_child(a, role: str, run_dir: Path, side_set: list[str], result: Path | None = None,
              share_prefix: bool = True) -> None:
    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, __file__, "--child", role, "--run-dir", str(run_dir), "--config", a.config,
           "--threads", str(a.threads), "--result", str(result or ""), "--demos", str(a.demos),
           *([] if share_prefix else ["--no-prefix-sharing"]), "--common", *a.common, "--side-set", *side_set]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def side_summary(side: str, pair: int, raw: dict) -> dict:
    fast = raw["fast"]
    rl = statistics.median(raw["rl_step_seconds"])
    reflect_proposals = fast["proposals_by_operator"].get("reflect", 0)
    guard = {k: n for k, n in fast["rejected_by_operator"].get("reflect", {}).items() if k != "not_better"}
    return {
        "side": side, "pair": pair, "seconds_round": fast["seconds"], "proposals": fast["proposals"],
        "accepted": fast["accepted"], "metric_calls": fast["metric_calls"], "waves": fast["waves"],
        "proposals_by_operator": fast["proposals_by_operator"], "accepted_by_operator": fast["accepted_by_operator"],
        "rejected_by_operator": fast["rejected_by_operator"], "skipped": fast["skipped"],
        "seconds_reflecting": fast["seconds_reflecting"], "seconds_scoring": fast["seconds_scoring"],
        "seconds_proposing": fast["seconds_proposing"], "reflector_tokens": fast["reflector_tokens"],
        "reflect_guard_pass": reflect_proposals - sum(guard.values()), "reflect_proposals": reflect_proposals,
        "rl_step_seconds": raw["rl_step_seconds"], "rl_step_median": rl,
        "round_in_rl_steps": fast["seconds"] / rl, "accepted_prompts": fast["accepted_prompts"],
        "replies": raw["replies"][:SHOWN_REPLIES],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny.yaml")
    ap.add_argument("--pairs", type=int, default=2, help="alternating sequential/wave pairs")
    ap.add_argument("--baseline", nargs="*", default=["fast.wave=1"],
                    help="overrides of the sequential side (the wave side runs the config as it is)")
    ap.add_argument("--before", action="store_true", help="also time the round as it was before waves")
    ap.add_argument("--demos", type=int, default=0, help="gold worked examples given to every pool context")
    ap.add_argument("--unshared", action="store_true", help="also time the wave round with prefix sharing off")
    ap.add_argument("--common", nargs="*", default=[], help="overrides for every run, e.g. fast.wave=8")
    ap.add_argument("--proposals", type=int, default=12,
                    help="proposals per round on every side (fast.max_proposals); 0 = the config's budget decides")
    ap.add_argument("--threads", type=int, default=0, help="torch/OMP threads per process (0 = default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--child", choices=["prep", "side"], help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--side-set", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--no-prefix-sharing", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a)
    if a.proposals:
        a.common = [f"fast.max_proposals={a.proposals}", "fast.budget=100", *a.common]

    sides = (({"before": BEFORE_WAVES} if a.before else {}) | {"sequential": list(a.baseline), "wave": []}
             | ({"unshared": []} if a.unshared else {}))  # unshared: the wave side, prefix sharing off
    work = Path(tempfile.mkdtemp(prefix="fast_round_"))
    started = time.perf_counter()
    try:
        prep = work / "prep"
        print(f"[bench] prep: RL steps 0-{RL_STEPS_BEFORE - 1} of {a.config} (mode=fst), checkpointed", file=sys.stderr)
        run_child(a, "prep", prep, [])
        runs = []
        for pair in range(a.pairs):
            order = list(sides) if pair % 2 == 0 else list(sides)[::-1]
            for side in order:
                run_dir = work / f"{side}-{pair}"
                shutil.copytree(prep, run_dir)
                result = work / f"{side}-{pair}.json"
                run_child(a, "side", run_dir, a.common + sides[side], result, share_prefix=side != "unshared")
                runs.append(side_summary(side, pair, json.loads(result.read_text())))
                r = runs[-1]
                print(f"[bench] pair {pair} {side:>10}: {r['seconds_round']:.1f} s, {r['proposals']} proposals, "
                      f"{r['accepted']} accepted, {r['round_in_rl_steps']:.1f} RL steps", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    pairs = []
    for pair in range(a.pairs):
        seq, wav = (next(r for r in runs if r["pair"] == pair and r["side"] == s) for s in ("sequential", "wave"))
        equal = seq["proposals"] == wav["proposals"]
        per = lambda r: r["seconds_round"] / max(r["proposals"], 1)  # noqa: E731
        pairs.append({"pair": pair, "equal_proposals": equal,
                      "ratio": wav["seconds_round"] / seq["seconds_round"] if equal else None,
                      "ratio_per_proposal": per(wav) / per(seq) if seq["proposals"] and wav["proposals"] else None})
        if a.before:
            old = next(r for r in runs if r["pair"] == pair and r["side"] == "before")
            pairs[-1]["before_round_in_rl_steps"] = old["round_in_rl_steps"]
            pairs[-1]["wave_round_in_rl_steps"] = wav["round_in_rl_steps"]
        if a.unshared:
            uns = next(r for r in runs if r["pair"] == pair and r["side"] == "unshared")
            pairs[-1]["wave_over_unshared"] = (wav["seconds_round"] / uns["seconds_round"]
                                               if uns["proposals"] == wav["proposals"] else None)
    equal_ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    per_ratios = [p["ratio_per_proposal"] for p in pairs if p["ratio_per_proposal"] is not None]
    summary = {
        "settings": {"config": a.config, "pairs": a.pairs, "sides": sides, "common": a.common, "threads": a.threads,
                     "timed_step": RL_STEPS_BEFORE, "demos": a.demos},
        "runs": runs, "pairs": pairs,
        "ratio": statistics.median(equal_ratios) if equal_ratios else None,
        "ratio_per_proposal": statistics.median(per_ratios) if per_ratios else None,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fast_round-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))

    print(f"\n{'pair':>4} {'side':>10} {'s/round':>8} {'props':>5} {'acc':>3} {'rollouts':>8} {'reflect s':>9} "
          f"{'score s':>7} {'refl tok':>8} {'s/RL step':>9} {'round/RL':>8}")
    for r in runs:
        print(f"{r['pair']:>4} {r['side']:>10} {r['seconds_round']:>8.1f} {r['proposals']:>5} {r['accepted']:>3} "
              f"{r['metric_calls']:>8} {r['seconds_reflecting']:>9.1f} {r['seconds_scoring']:>7.1f} "
              f"{r['reflector_tokens']:>8} {r['rl_step_median']:>9.1f} {r['round_in_rl_steps']:>8.1f}")
    for p in pairs:
        if p["equal_proposals"]:
            print(f"pair {p['pair']}: equal proposals, wave/sequential time ratio {p['ratio']:.2f}")
        elif p["ratio_per_proposal"] is not None:
            print(f"pair {p['pair']}: proposals differ, so no time ratio; seconds per proposal, wave/sequential: "
                  f"{p['ratio_per_proposal']:.2f} (normalised per proposal)")
        if a.before:
            print(f"pair {p['pair']}: the round cost {p['before_round_in_rl_steps']:.1f} RL steps before waves, "
                  f"{p['wave_round_in_rl_steps']:.1f} now (different work: no ratio)")
        if a.unshared:
            print(f"pair {p['pair']}: " + (f"wave / unshared (prefix sharing on / off) time ratio {p['wave_over_unshared']:.2f}"
                                           if p["wave_over_unshared"] is not None else
                                           "wave and unshared made different numbers of proposals: no ratio"))
    for r in runs:
        print(f"{r['side']} pair {r['pair']}: reflect proposals passing the guards "
              f"{r['reflect_guard_pass']}/{r['reflect_proposals']}, accepted {r['accepted_by_operator']}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
