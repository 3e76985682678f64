"""bench/gpu_session_e2e.py -- one job: stage 4 of bench/gpu_session.sh, `fst.py` end to end on a lent GPU
with nothing downloaded: a run in mode fst with a fast round and a checkpoint, then `--resume` going on.

    python bench/gpu_session_e2e.py --out bench/out/gpu            # a random Qwen2.5-1.5B-shaped model
    python bench/gpu_session_e2e.py --smoke --out /tmp/e2e         # gpu_check.py's toy shapes on a CPU

The model is random-init with the real shapes, saved with gpu_check.build_folder's in-code tokenizer
(the words of the data below, Qwen's special ids, a Qwen-style chat template). The data is synthetic
GSM8K JSONL (`question`, `answer` ending in `#### N`) given as task.train_path / task.test_path. Each run
is `fst.main` in a child process on configs/gsm8k.yaml with a few keys set small (2 steps, B=2 x G=4,
a fast round after step 1, validation at 0, 2 and 3, a checkpoint every step), then `--resume` with
train.steps=3. A random model never answers right, so the children score with the real GSM8K grader
(math_verify runs) and then hand out the parity of the completion's length as the reward, as the
tests' parity_get_task does: groups get mixed rewards and every update runs. PYTORCH_CUDA_ALLOC_CONF
is expandable_segments:True. Writes e2e.json: each run's exit code, seconds and peak memory, and
the metrics rows by kind; exits 1 when a run failed or the resumed run did not continue the first.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (puts the project root on sys.path)

NAMES, ITEMS = ["Ann", "Ben", "Cleo", "Dev", "Eli", "Fay"], ["apples", "books", "coins", "pens", "shells"]


def synthetic_gsm8k(n: int, seed: int) -> list[dict]:
    """n GSM8K-style rows: a two-number word problem and a worked answer ending in '#### N'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, what, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"question": f"{who} has {a} {what} and gets {b} more . How many {what} does {who} have now ?",
                     "answer": f"{who} has {a} + {b} = {a + b} {what} .\n#### {a + b}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_args(folder: Path, data: dict[str, Path], out: Path, smoke: bool) -> list[str]:
    """fst.py's command line: configs/gsm8k.yaml with the model, data and a small fast schedule set."""
    keys = {"model.name": folder, "task.train_path": data["train"], "task.test_path": data["test"], "mode": "fst",
            "out_dir": out, "run_name": "e2e", "train.steps": 2, "train.batch_size": 2, "sampling.group_size": 4,
            "sampling.max_new_tokens": 48, "train.micro_batch": 4, "train.save_every": 1, "fast.every": 2,
            "fast.budget": 2, "fast.minibatch": 2, "fast.wave": 2, "fast.max_proposals": 2, "fast.patience": 2,
            "fast.reflector_max_new_tokens": 32, "eval.every": 2, "eval.n": 4, "eval.k": 2}
    if smoke:
        keys |= {"device": "cpu", "model.dtype": "float32", "model.quant": "none", "sampling.max_new_tokens": 16,
                 "fast.reflector_max_new_tokens": 16}
    if importlib.util.find_spec("bitsandbytes") is None:
        keys["model.quant"] = "none"  # the recipe's NF4 base needs it (e2e.json's args say which ran)
    return ["--config", "gsm8k.yaml", *(x for k, v in keys.items() for x in ("--set", f"{k}={v}"))]


def child(argv: list[str]) -> None:
    """In the child process: fst.main(argv) with the GSM8K grader's verdict replaced by length parity
    (the grader still runs), then one JSON line with the peak GPU memory."""
    import rewards
    import fst
    real = rewards.get_task

    def parity_task(name, **options):
        task = real(name, **options)
        grade = task.score

        def score(problem, completion):
            reward, feedback = grade(problem, completion)
            return float(len(completion) % 2), f"parity (grader: {reward})"
        task.score = score
        return task
    rewards.get_task = parity_task
    fst.main(argv)
    import torch
    if torch.cuda.is_available():
        peaks = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30]
        print(json.dumps({"peak_gib": round(peaks[0], 3), "peak_reserved_gib": round(peaks[1], 3)}))


def run_child(argv: list[str]) -> dict:
    """One fst.py run in a child process (its log goes to this process's stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], stdout=subprocess.PIPE, text=True)
    res = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines and lines[-1].startswith("{"):
        res |= json.loads(lines[-1])
    return res


def check_runs(run_dir: Path) -> tuple[dict, list[str]]:
    """(what the two runs left: metrics rows by kind, checkpoints), [problems]."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row.get("kind", "?"), []).append(row)
    steps = [r["step"] for r in by_kind.get("train", [])]
    ckpts = sorted(p.name for p in run_dir.glob("checkpoints/step_*[0-9]"))
    problems = []
    if steps != [0, 1, 2]:
        problems.append(f"train steps logged {steps}, want [0, 1, 2] (two steps, then one more after --resume)")
    if not by_kind.get("fast"):
        problems.append("no fast round logged")
    if "step_000001" not in ckpts or "step_000002" not in ckpts:
        problems.append(f"checkpoints {ckpts}, want step_000001 (first run) and step_000002 (resumed)")
    keep = ("step", "reward_mean", "loss", "kl", "rows_trained", "seconds_step", "seconds_sampling",
            "seconds_training", "seconds_fast", "accuracy", "mean_at_k", "seconds")
    summary = {"rows_by_kind": {k: len(v) for k, v in by_kind.items()}, "checkpoints": ckpts,
               "train": [{k: r[k] for k in keep if k in r} for r in by_kind.get("train", [])],
               "fast": [{k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in by_kind.get("fast", [])],
               "eval": [{k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in by_kind.get("eval", [])]}
    return summary, problems


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(gpu_check.ROOT / "bench" / "out" / "gpu"))
    ap.add_argument("--smoke", action="store_true", help="toy shapes on the CPU (CI's self-test of this script)")
    a = ap.parse_args()
    import torch
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_session_e2e.py needs a CUDA GPU (none visible); on a CPU use --smoke")
    t0 = time.perf_counter()
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and shutil.disk_usage(shm).free > 8 * gpu_check.GIB  # the 1.5B bf16 folder is ~3.5 GB
    root = Path(tempfile.mkdtemp(prefix="gpu-e2e-", dir=shm if in_ram and not a.smoke else None))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": "smoke" if a.smoke else "qwen2.5-1.5b"}

    def stopped(signum, frame):  # `timeout` (bench/gpu_session.sh) sends SIGTERM
        raise TimeoutError("stopped by SIGTERM (a timeout)")
    signal.signal(signal.SIGTERM, stopped)
    try:
        rows = {"train": synthetic_gsm8k(16, 0), "test": synthetic_gsm8k(8, 1)}
        data = {split: write_jsonl(root / f"{split}.jsonl", r) for split, r in rows.items()}
        words = " ".join(r["question"] + " " + r["answer"] for split in rows.values() for r in split).split()
        folder = gpu_check.build_folder(report["model"], root, "cuda" if not a.smoke else "cpu", words=words)
        report["seconds_build"] = round(time.perf_counter() - t0, 1)
        args = run_args(folder, data, root / "runs", a.smoke)
        report["args"] = args
        report["first"] = run_child(args)
        report["resumed"] = run_child(["--resume", str(root / "runs" / "e2e"), "--set", "train.steps=3"])
        report["runs"], problems = check_runs(root / "runs" / "e2e")
        problems = [f"{k} run exited {report[k]['rc']} (its log: above)" for k in ("first", "resumed")
                    if report[k]["rc"]] + problems
    except Exception as e:  # a timeout (SIGTERM, below) too: e2e.json keeps what the runs got to
        problems = [f"{type(e).__name__}: {e}"]
        if (root / "runs" / "e2e").is_dir():
            report["runs"] = check_runs(root / "runs" / "e2e")[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["problems"], report["seconds"] = problems, round(time.perf_counter() - t0, 1)
    (out / "e2e.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"problems": problems, "json": str(out / "e2e.json")}))
    if problems:
        raise SystemExit("[e2e] " + "; ".join(problems))


if __name__ == "__main__":
    main()
