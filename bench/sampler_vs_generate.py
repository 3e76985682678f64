"""bench/sampler_vs_generate.py -- one job: decode tokens/s of fst's rollout.sample vs HF model.generate.

    python bench/sampler_vs_generate.py                          # fp32 and bf16, 3 alternating repeats
    python bench/sampler_vs_generate.py --dtypes float32 --threads 2

Same model object for both (models.load_model: SmolLM2-135M-Instruct + LoRA r=16, as the RL loop samples
it), same prompts (the tiny config's task's problems under its seed prompt),
G samples per prompt, same temperature / top_p / max_new_tokens / EOS ids. generate gets its fair best:
the prompts left-padded and repeated G times (repeat_interleave), an attention mask, use_cache=True,
top_k off. Tokens counted alike: fst's decode_tokens; for generate each row's tokens up to and including
its first EOS (the pad columns after it are not counted, though generate computes them). Timed calls
alternate fst, generate, fst, ... after one short warm-up each; ratio = fst tok/s / generate tok/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import models  # noqa: E402
import fst  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402


def prompts_for(cfg, tok, n: int) -> list[list[int]]:
    task = rewards.make_task(cfg.task)
    problems = task.load("test")[:n]
    prompt = rewards.seed_prompt(task, cfg.task.system_prompt)   # "" = the task's own prompt, as fst.py does
    return [rollout.encode_chat(tok, task.messages(p, prompt)) for p in problems]


def run_fst(model, tok, prompts, a, seed) -> tuple[int, float, float]:
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    ro = rollout.sample(model, tok, prompts, [a.group_size] * len(prompts), max_new_tokens=a.max_new_tokens,
                        temperature=a.temperature, top_p=a.top_p, generator=gen)
    dt = time.perf_counter() - t0
    return ro.decode_tokens, dt, statistics.mean(len(c) for c in ro.completion_ids)


@torch.inference_mode()
def run_generate(model, tok, prompts, a, seed, eos) -> tuple[int, float, float]:
    torch.manual_seed(seed)
    P, pad = max(map(len, prompts)), tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts]).repeat_interleave(a.group_size, 0)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(a.group_size, 0)
    model.eval()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=a.temperature,
                         top_p=a.top_p, top_k=0, max_new_tokens=a.max_new_tokens, eos_token_id=sorted(eos),
                         pad_token_id=pad, use_cache=True)
    dt = time.perf_counter() - t0
    new = out[:, P:]
    is_eos = torch.isin(new, torch.tensor(sorted(eos)))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1],
                                                                                      dtype=torch.long))
    return int(first.sum()), dt, first.float().mean().item()


def bench_dtype(a, dtype: str) -> dict:
    cfg = fst.load_config("tiny.yaml", [f"model.dtype={dtype}"])
    torch.manual_seed(0)
    model, tok = models.load_model(cfg.model, torch.device("cpu"))
    model.eval()
    prompts = prompts_for(cfg, tok, a.prompts)
    eos = rollout._eos_ids(model, tok)
    print(f"[bench] {dtype}: {len(prompts)} prompts of {[len(p) for p in prompts]} tokens x G={a.group_size}, "
          f"{a.max_new_tokens} new tokens, T={a.temperature}", file=sys.stderr)
    warm = argparse.Namespace(**{**vars(a), "max_new_tokens": 8})
    run_fst(model, tok, prompts, warm, 0)
    run_generate(model, tok, prompts, warm, 0, eos)
    reps = []
    for r in range(a.repeats):
        row = {}
        for side in ("fst", "generate"):
            n, dt, mean_len = (run_fst(model, tok, prompts, a, a.seed + r) if side == "fst"
                               else run_generate(model, tok, prompts, a, a.seed + r, eos))
            row[side] = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "mean_len": mean_len}
            print(f"  {dtype} rep {r} {side:>8}: {n} tokens in {dt:.1f}s = {n / dt:.1f} tok/s "
                  f"(mean completion {mean_len:.1f})", file=sys.stderr)
        row["ratio"] = row["fst"]["tokens_per_s"] / row["generate"]["tokens_per_s"]
        reps.append(row)
    med = lambda f: statistics.median(f(x) for x in reps)
    return {"dtype": dtype, "prompt_tokens": [len(p) for p in prompts], "repeats": reps,
            "fst_tokens_per_s": med(lambda x: x["fst"]["tokens_per_s"]),
            "generate_tokens_per_s": med(lambda x: x["generate"]["tokens_per_s"]),
            "ratio": med(lambda x: x["ratio"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="alternating fst/generate pairs (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results = [bench_dtype(a, d) for d in a.dtypes]
    summary = {"settings": {k: v for k, v in vars(a).items() if k != "out"} | {"threads_used": torch.get_num_threads()},
               "results": results, "target_ratio": 1.5,
               "target_met": all(r["ratio"] >= 1.5 for r in results)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sampler_vs_generate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"\n{'dtype':>9} {'rep':>3} {'fst tok/s':>10} {'gen tok/s':>10} {'ratio':>6} {'fst len':>7} {'gen len':>7}")
    for r in results:
        for i, x in enumerate(r["repeats"]):
            print(f"{r['dtype']:>9} {i:>3} {x['fst']['tokens_per_s']:>10.1f} {x['generate']['tokens_per_s']:>10.1f} "
                  f"{x['ratio']:>6.2f} {x['fst']['mean_len']:>7.1f} {x['generate']['mean_len']:>7.1f}")
        print(f"{r['dtype']:>9} {'med':>3} {r['fst_tokens_per_s']:>10.1f} {r['generate_tokens_per_s']:>10.1f} "
              f"{r['ratio']:>6.2f}")
    print(f"target fst/generate >= 1.5 in every dtype: {summary['target_met']}   -> {path}")


if __name__ == "__main__":
    main()
