"""bench/step_vs_trl.py -- one job: seconds per RL step and peak RSS, fst vs TRL's GRPOTrainer, same step.

    python bench/step_vs_trl.py                          # fp32, 3 pairs, 1 warm-up + 4 timed steps per side
    python bench/step_vs_trl.py --dtype bfloat16 --threads 2

Each side runs in its own child process (warm-up + N steps), alternating fst, TRL, fst, TRL, ...; the
child's peak RSS comes from os.wait4 (the kernel's ru_maxrss of that one process). fst is its own loop
(`python fst.py --config tiny.yaml --set ...`, step times from metrics.jsonl); TRL is GRPOTrainer with a
callback timing on_step_begin -> on_step_end. Same model (SmolLM2-135M-Instruct), LoRA r=16 alpha=32 on
all linear layers, same prompts in the same order (fst's ProblemStream of the tiny config's task
task and system prompt), 1 prompt x G=4 completions per step, 64 new tokens, temperature 0.7, lr 1e-4,
CISPO loss (TRL loss_type="cispo", epsilon_high=4 = fst cispo_tau) and KL to the base: fst always runs one
no-grad base pass (kl_coef 0.001), so TRL gets beta=0.001, which makes it run the same no-grad pass with
the adapter disabled. Equal work: TRL runs forward and backward on every group, even one whose rewards are
all equal (zero advantage), where fst would drop it; fst runs with train.keep_equal_groups=true, so every
step of both sides is a full update. A timed fst step that still did not update (a guard skipped it)
means no ratio is reported. Ratios < 1 mean fst is cheaper.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARK = "@@BENCH "


def fst_overrides(a, out_dir: Path, name: str) -> list[str]:
    sets = {"train.steps": a.warmup + a.steps, "train.batch_size": 1, "sampling.group_size": a.group_size,
            "sampling.max_new_tokens": a.max_new_tokens, "sampling.temperature": a.temperature,
            "train.lr": a.lr, "train.kl_coef": a.beta, "train.loss": "cispo", "model.dtype": a.dtype,
            "train.save_every": 10**6, "train.keep_equal_groups": True, "out_dir": str(out_dir), "run_name": name,
            "mode": "rl", "eval.every": 0}   # the RL step alone (tiny.yaml itself runs fst with validation)
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def run_child(cmd: list[str], threads: int, timeout: float, log: Path) -> tuple[dict, float]:
    """Run one side; return (the JSON it printed after MARK or {}, its peak RSS in GB via wait4)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline, status, usage = time.monotonic() + timeout, None, None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
            elif time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                print(f"  ! timed out after {timeout:.0f}s: {' '.join(cmd[:4])} ...", file=sys.stderr)
            else:
                time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    text = log.read_text()
    if proc.returncode != 0:
        print(f"  ! exit {proc.returncode}; last lines of {log}:\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
    lines = [ln[len(MARK):] for ln in text.splitlines() if ln.startswith(MARK)]
    return (json.loads(lines[-1]) if lines else {}), usage.ru_maxrss / 2**20  # KiB -> GiB


def side_fst(a, workdir: Path, tag: str) -> list[str]:
    return [sys.executable, "fst.py", "--config", "tiny.yaml", *fst_overrides(a, workdir, tag)]


def read_fst(workdir: Path, tag: str, a) -> dict:
    rows = [json.loads(ln) for ln in (workdir / tag / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "train"][a.warmup:]
    # A full update trained some rows (entropy is None when none were) and no guard skipped it.
    not_updated = [r["step"] for r in rows if r["entropy"] is None or r["update_skipped"] is not None]
    return {"step_s": [r["seconds_step"] for r in rows], "steps_without_update": not_updated,
            "completion_len": statistics.mean(r["completion_len_mean"] for r in rows),
            "parts_s": {k: statistics.median(r[k] for r in rows)
                        for k in ("seconds_sampling", "seconds_base_kl", "seconds_training")}}


def trl_child(a):
    """Runs inside the TRL child process: GRPOTrainer for warm-up + N steps, prints MARK + JSON."""
    # Imported here, not at the top: the parent process only launches and times the children.
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import fst
    from plumbing import models, seeds
    import rewards

    torch.set_num_threads(a.threads)
    cfg = fst.load_config("tiny.yaml")
    task = rewards.make_task(cfg.task)
    stream = rewards.ProblemStream(task.load("train"), 1, seeds.seed_for("stream", cfg.train.seed))  # fst's order
    rows = [dict(p, prompt=task.messages(p, rewards.seed_prompt(task, cfg.task.system_prompt)))
            for p in (stream.next_batch()[0] for _ in range(a.warmup + a.steps))]
    lengths = []

    def reward(prompts, completions, completion_ids, **kw):
        lengths.extend(len(c) for c in completion_ids)
        # TRL passes the dataset's other columns as lists: rebuild each problem from the task's own fields
        problems = [{k: kw[k][i] for k in rows[0] if k != "prompt" and k in kw} for i in range(len(prompts))]
        return [rewards.score_completion(task, p, c[0]["content"])[0] for p, c in zip(problems, completions)]

    class Timer(TrainerCallback):
        times, t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    dtype = getattr(torch, a.dtype)
    args = GRPOConfig(
        output_dir=a.trl_out, per_device_train_batch_size=a.group_size,
        num_generations=a.group_size, max_completion_length=a.max_new_tokens, temperature=a.temperature,
        top_p=1.0, top_k=0, learning_rate=a.lr, beta=a.beta, loss_type="cispo", epsilon_high=4.0,
        max_steps=a.warmup + a.steps, shuffle_dataset=False, use_cpu=True, bf16=a.dtype == "bfloat16",
        gradient_checkpointing=a.trl_gradient_checkpointing, report_to="none", logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=cfg.train.seed,
        model_init_kwargs={"dtype": dtype, "attn_implementation": "sdpa"}, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = Timer()
    trainer = GRPOTrainer(model=models.resolve_model_path(cfg.model.name), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows), peft_config=lora, callbacks=[timer])
    trainer.train()
    n_warm = a.warmup * a.group_size
    print(MARK + json.dumps({"step_s": timer.times[a.warmup:],
                             "completion_len": statistics.mean(lengths[n_warm:] or [0])}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--pairs", type=int, default=3, help="fst/TRL pairs, alternating (median over pairs)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--group-size", type=int, default=4, help="G completions of 1 prompt per step")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.001, help="fst kl_coef = TRL beta (>0: base pass in both)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL's own default (on); off by default to match fst's tiny config")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in each child")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)  # internal: run as the TRL child
    ap.add_argument("--trl-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side == "trl":
        return trl_child(a)
    work = Path(tempfile.mkdtemp(prefix="fst-bench-"))
    print(f"[bench] {a.dtype}, {a.threads} thread(s), {a.pairs} pairs x (fst, trl), "
          f"{a.warmup} warm-up + {a.steps} timed steps each; logs in {work}", file=sys.stderr)
    summary = summarise(a, [run_pair(a, work, i) for i in range(a.pairs)])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_vs_trl-{a.dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))
    print_table(summary, path)


def run_pair(a, work: Path, i: int) -> dict:
    """One fst run and one TRL run (child processes, in that order): their step times and peak RSS."""
    trl_cmd = [sys.executable, __file__, "--side", "trl", "--trl-out", str(work / "trl-out")] + [
        x for k in ("dtype", "steps", "warmup", "group_size", "max_new_tokens", "temperature", "lr", "beta", "threads")
        for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))] + (
        ["--trl-gradient-checkpointing"] if a.trl_gradient_checkpointing else [])
    res = {}
    for side in ("fst", "trl"):
        tag = f"{side}-{i}"
        t0 = time.perf_counter()
        data, rss = run_child(side_fst(a, work, tag) if side == "fst" else trl_cmd, a.threads, a.timeout,
                              work / f"{tag}.log")
        if side == "fst" and (work / tag / "metrics.jsonl").exists():
            data = read_fst(work, tag, a)
        if not data.get("step_s"):
            raise SystemExit(f"[bench] {side} run {i} produced no step times (see {work / (tag + '.log')})")
        res[side] = dict(data, peak_rss_gb=rss, step_s_median=statistics.median(data["step_s"]))
        print(f"  pair {i} {side}: {res[side]['step_s_median']:.2f} s/step, {rss:.2f} GB peak RSS, "
              f"completion {data['completion_len']:.1f} tok ({time.perf_counter() - t0:.0f}s wall)", file=sys.stderr)
    not_updated = res["fst"]["steps_without_update"]
    if not_updated:  # unequal work: the TRL side trained on every step
        print(f"  ! pair {i}: fst steps {not_updated} ran no update: no time ratio for this pair", file=sys.stderr)
    res["time_ratio"] = None if not_updated else res["fst"]["step_s_median"] / res["trl"]["step_s_median"]
    res["rss_ratio"] = res["fst"]["peak_rss_gb"] / res["trl"]["peak_rss_gb"]
    return res


def summarise(a, pairs: list[dict]) -> dict:
    med = lambda f: statistics.median(f(p) for p in pairs)  # noqa: E731
    equal_work = all(p["time_ratio"] is not None for p in pairs)
    summary = {
        "dtype": a.dtype, "threads": a.threads, "pairs": a.pairs, "steps": a.steps, "warmup": a.warmup,
        "settings": {k: getattr(a, k) for k in ("group_size", "max_new_tokens", "temperature", "lr", "beta")}
        | {"prompts_per_step": 1, "lora": "r16 alpha32 all-linear", "loss": "cispo",
           "fst_keep_equal_groups": True, "trl_gradient_checkpointing": a.trl_gradient_checkpointing,
           "trl_bf16_autocast": a.dtype == "bfloat16",
           "trl_beta_note": "beta=kl_coef: both sides run one no-grad base (adapter-off) pass per step"},
        "fst_s_per_step": med(lambda p: p["fst"]["step_s_median"]),
        "trl_s_per_step": med(lambda p: p["trl"]["step_s_median"]),
        "fst_peak_rss_gb": med(lambda p: p["fst"]["peak_rss_gb"]),
        "trl_peak_rss_gb": med(lambda p: p["trl"]["peak_rss_gb"]),
        "equal_work": equal_work,
        "time_ratio_fst_over_trl": med(lambda p: p["time_ratio"]) if equal_work else None,
        "rss_ratio_fst_over_trl": med(lambda p: p["rss_ratio"]),
        "pairs_detail": pairs, "versions": versions(),
    }
    summary["targets_met"] = {
        "time_ratio<=0.5": summary["time_ratio_fst_over_trl"] <= 0.5 if equal_work else None,
        "rss_ratio<=1": summary["rss_ratio_fst_over_trl"] <= 1.0}
    return summary


def print_table(s: dict, path: Path):
    ratio = lambda x, width: f"{x:>{width}.3f}" if x is not None else f"{'n/a':>{width}}"  # noqa: E731
    print(f"\n{'pair':>4} {'fst s/step':>10} {'trl s/step':>10} {'time ratio':>10} "
          f"{'fst RSS GB':>10} {'trl RSS GB':>10} {'RSS ratio':>9} {'fst len':>7} {'trl len':>7}")
    for i, p in enumerate(s["pairs_detail"]):
        print(f"{i:>4} {p['fst']['step_s_median']:>10.2f} {p['trl']['step_s_median']:>10.2f} "
              f"{ratio(p['time_ratio'], 10)} {p['fst']['peak_rss_gb']:>10.2f} {p['trl']['peak_rss_gb']:>10.2f} "
              f"{p['rss_ratio']:>9.3f} {p['fst']['completion_len']:>7.1f} {p['trl']['completion_len']:>7.1f}")
    print(f"{'med':>4} {s['fst_s_per_step']:>10.2f} {s['trl_s_per_step']:>10.2f} "
          f"{ratio(s['time_ratio_fst_over_trl'], 10)} {s['fst_peak_rss_gb']:>10.2f} {s['trl_peak_rss_gb']:>10.2f} "
          f"{s['rss_ratio_fst_over_trl']:>9.3f}")
    parts = {k: statistics.median(p["fst"]["parts_s"][k] for p in s["pairs_detail"])
             for k in s["pairs_detail"][0]["fst"]["parts_s"]}
    print("fst phases (s, median): " + ", ".join(f"{k[8:]} {v:.2f}" for k, v in parts.items()))
    if not s["equal_work"]:
        print("no time ratio: some timed fst steps ran no update (see the '!' lines), so the sides did unequal work")
    t = s["targets_met"]
    print(f"targets: fst/trl time <= 0.5: {t['time_ratio<=0.5']}; fst/trl peak RSS <= 1: {t['rss_ratio<=1']}   -> {path}")


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}


if __name__ == "__main__":
    main()
