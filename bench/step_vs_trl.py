"""bench/step_vs_trl.py -- one job: seconds per RL step and peak RSS, fst vs TRL's GRPOTrainer, same step.

    python bench/step_vs_trl.py                          # fp32, 3 pairs, 1 warm-up + 4 timed steps per side
    python bench/step_vs_trl.py --dtype bfloat16 --threads 2

Each side runs in its own child process (warm-up + N steps), alternating fst, TRL, fst, TRL, ...; the
child's peak RSS comes from os.wait4 (the kernel's ru_maxrss of that one process). fst is its own loop
(`python fst.py --config tiny.yaml --set ...`, step times from metrics.jsonl); TRL is GRPOTrainer with a
callback timing on_step_begin -> on_step_end. Same model (SmolLM2-135M-Instruct), LoRA r=16 alpha=32 on
all linear layers, same prompts in the same order (fst's ProblemStream of the tiny config's arithmetic
task and system prompt), 1 prompt x G=4 completions per step, 64 new tokens, temperature 0.7, lr 1e-4,
CISPO loss (TRL loss_type="cispo", epsilon_high=4 = fst cispo_tau) and KL to the base: fst always runs one
no-grad base pass (kl_coef 0.001), so TRL gets beta=0.001, which makes it run the same no-grad pass with
the adapter disabled. Ratios < 1 mean fst is cheaper.
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
            "train.save_every": 10**6, "out_dir": str(out_dir), "run_name": name}
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
    # fst skips the update when every group has equal rewards; TRL always runs forward+backward.
    # Like for like: time the steps that trained (all steps if none did, flagged in the JSON).
    trained = [r for r in rows if r["dropped_group_frac"] < 1.0]
    if not trained:
        print("  ! no timed fst step ran an update: its time is a lower bound (raise --steps)", file=sys.stderr)
    trained = trained or rows
    return {"step_s": [r["seconds_step"] for r in trained], "step_s_all": [r["seconds_step"] for r in rows],
            "skipped_update_steps": sum(r["dropped_group_frac"] >= 1.0 for r in rows),
            "completion_len": statistics.mean(r["completion_len_mean"] for r in rows),
            "parts_s": {k: statistics.median(r[k] for r in trained)
                        for k in ("seconds_sampling", "seconds_base_kl", "seconds_training")}}


def trl_child(a):
    """Runs inside the TRL child process: GRPOTrainer for warm-up + N steps, prints MARK + JSON."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import fst
    import rewards

    torch.set_num_threads(a.threads)
    cfg = fst.load_config("tiny.yaml")
    task = rewards.get_task("arithmetic", **fst._task_options(cfg.task))
    stream = rewards.ProblemStream(task.load("train"), 1, cfg.train.seed)  # fst's order, fst's seed
    rows = [dict(p, prompt=task.messages(p, cfg.task.system_prompt))
            for p in (stream.next_batch()[0] for _ in range(a.warmup + a.steps))]
    lengths = []

    def reward(prompts, completions, completion_ids, **kw):
        lengths.extend(len(c) for c in completion_ids)
        problems = [{k: kw[k][i] for k in ("id", "question", "answer", "computation")} for i in range(len(prompts))]
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
    trainer = GRPOTrainer(model=fst.resolve_model_path(cfg.model.name), reward_funcs=reward, args=args,
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

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fst-bench-"))
    trl_cmd = [sys.executable, __file__, "--side", "trl", "--trl-out", str(work / "trl-out")] + [
        x for k in ("dtype", "steps", "warmup", "group_size", "max_new_tokens", "temperature", "lr", "beta", "threads")
        for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))] + (
        ["--trl-gradient-checkpointing"] if a.trl_gradient_checkpointing else [])
    print(f"[bench] {a.dtype}, {a.threads} thread(s), {a.pairs} pairs x (fst, trl), "
          f"{a.warmup} warm-up + {a.steps} timed steps each; logs in {work}", file=sys.stderr)
    pairs = []
    for i in range(a.pairs):
        res = {}
        for side in ("fst", "trl"):
            tag = f"{side}-{i}"
            t0 = time.perf_counter()
            cmd = side_fst(a, work, tag) if side == "fst" else trl_cmd
            data, rss = run_child(cmd, a.threads, a.timeout, work / f"{tag}.log")
            if side == "fst" and (work / tag / "metrics.jsonl").exists():
                data = read_fst(work, tag, a)
            if not data.get("step_s"):
                raise SystemExit(f"[bench] {side} run {i} produced no step times (see {work / (tag + '.log')})")
            res[side] = dict(data, peak_rss_gb=rss, step_s_median=statistics.median(data["step_s"]),
                             all_steps_median=statistics.median(data.get("step_s_all", data["step_s"])))
            print(f"  pair {i} {side}: {res[side]['step_s_median']:.2f} s/step, {rss:.2f} GB peak RSS, "
                  f"completion {data['completion_len']:.1f} tok, {data.get('skipped_update_steps', 0)} steps "
                  f"without update ({time.perf_counter() - t0:.0f}s wall)",
                  file=sys.stderr)
        res["time_ratio"] = res["fst"]["step_s_median"] / res["trl"]["step_s_median"]
        res["time_ratio_all_steps"] = res["fst"]["all_steps_median"] / res["trl"]["step_s_median"]
        res["rss_ratio"] = res["fst"]["peak_rss_gb"] / res["trl"]["peak_rss_gb"]
        pairs.append(res)

    med = lambda f: statistics.median(f(p) for p in pairs)
    summary = {
        "dtype": a.dtype, "threads": a.threads, "pairs": a.pairs, "steps": a.steps, "warmup": a.warmup,
        "settings": {k: getattr(a, k) for k in ("group_size", "max_new_tokens", "temperature", "lr", "beta")}
        | {"prompts_per_step": 1, "lora": "r16 alpha32 all-linear", "loss": "cispo",
           "trl_gradient_checkpointing": a.trl_gradient_checkpointing, "trl_bf16_autocast": a.dtype == "bfloat16",
           "trl_beta_note": "beta=kl_coef: both sides run one no-grad base (adapter-off) pass per step"},
        "fst_s_per_step": med(lambda p: p["fst"]["step_s_median"]),
        "trl_s_per_step": med(lambda p: p["trl"]["step_s_median"]),
        "fst_peak_rss_gb": med(lambda p: p["fst"]["peak_rss_gb"]),
        "trl_peak_rss_gb": med(lambda p: p["trl"]["peak_rss_gb"]),
        "fst_s_per_step_all_steps": med(lambda p: p["fst"]["all_steps_median"]),
        "time_ratio_fst_over_trl": med(lambda p: p["time_ratio"]),
        "time_ratio_all_steps": med(lambda p: p["time_ratio_all_steps"]),
        "rss_ratio_fst_over_trl": med(lambda p: p["rss_ratio"]),
        "pairs_detail": pairs, "versions": versions(),
    }
    summary["targets_met"] = {"time_ratio<=0.5": summary["time_ratio_fst_over_trl"] <= 0.5,
                              "rss_ratio<=1": summary["rss_ratio_fst_over_trl"] <= 1.0}
    path = out / f"step_vs_trl-{a.dtype}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))
    print("\nfst s/step: steps that ran an update (like TRL's every step); 'all': every timed step")
    print(f"{'pair':>4} {'fst s/step':>10} {'(all)':>6} {'trl s/step':>10} {'time ratio':>10} {'(all)':>6} "
          f"{'fst RSS GB':>10} {'trl RSS GB':>10} {'RSS ratio':>9} {'fst len':>7} {'trl len':>7}")
    for i, p in enumerate(pairs):
        print(f"{i:>4} {p['fst']['step_s_median']:>10.2f} {p['fst']['all_steps_median']:>6.2f} "
              f"{p['trl']['step_s_median']:>10.2f} {p['time_ratio']:>10.3f} {p['time_ratio_all_steps']:>6.3f} "
              f"{p['fst']['peak_rss_gb']:>10.2f} {p['trl']['peak_rss_gb']:>10.2f} {p['rss_ratio']:>9.3f} "
              f"{p['fst']['completion_len']:>7.1f} {p['trl']['completion_len']:>7.1f}")
    s = summary
    print(f"{'med':>4} {s['fst_s_per_step']:>10.2f} {s['fst_s_per_step_all_steps']:>6.2f} {s['trl_s_per_step']:>10.2f} "
          f"{s['time_ratio_fst_over_trl']:>10.3f} {s['time_ratio_all_steps']:>6.3f} "
          f"{s['fst_peak_rss_gb']:>10.2f} {s['trl_peak_rss_gb']:>10.2f} {s['rss_ratio_fst_over_trl']:>9.3f}")
    parts = {k: statistics.median(p["fst"]["parts_s"][k] for p in pairs) for k in pairs[0]["fst"]["parts_s"]}
    print("fst phases (s, median): " + ", ".join(f"{k[8:]} {v:.2f}" for k, v in parts.items()))
    print(f"targets: fst/trl time <= 0.5: {s['targets_met']['time_ratio<=0.5']}; "
          f"fst/trl peak RSS <= 1: {s['targets_met']['rss_ratio<=1']}   -> {path}")


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}


if __name__ == "__main__":
    main()
