"""bench/prefix_sharing.py -- one job: what prefilling a shared context once buys, sharing on vs off.

    python bench/prefix_sharing.py --threads 2           # SmolLM2-135M, contexts ~300 and ~600 tokens, fp32 + bf16
    python bench/prefix_sharing.py --tiny                # a tiny random model, small shapes: the code path, ~20 s
    python bench/prefix_sharing.py --contexts 40 80 --min-shared 1 --dtypes float32   # where sharing stops paying

The FST workload: K=4 contexts (the tiny config's instruction and worked examples as chat turns,
pool.Context, as the demo operators build them; each context its own examples, as many as reach
about --contexts tokens) x B=8 test problems x G=2 samples, rows in fst's order (problem-major, a
problem's contexts together). The model is the policy fst trains (models.load_model: SmolLM2-135M from
the `smollm2-135m` alias + LoRA r=16), or with --tiny a 2-layer Llama of hidden size 64 with SmolLM2's
vocabulary, built in a temp folder and loaded the same way, and by default smaller shapes (SMOKE: options
given on the command line still win). Three phases, each with sharing on and off:

  sample  rollout.sample(..., share_prefix=on/off): prefill + decode, greedy by default so both sides
          decode the same tokens;
  base    rollout.sequence_logprobs without grad, adapter off (the base-model KL pass of fst.base_logprobs);
  train   rollout.sequence_logprobs + backward through LoRA (the pass of fst.update);
          both scoring phases run the rows of the off side's rollouts in rollout.micro_batches.

Sides alternate (on, off, then off, on, ...) after a warm-up of each. Equal work: a repeat's ratio
on/off counts only when both sides produced the same prompt and decode tokens (sample; the scoring
phases read one batch); otherwise the repeat is listed without a ratio, and a phase with no ratio in
any repeat has no median. Compute bound: FLOPs = 2 x params x tokens (forward; 4 x for forward + backward
to the activations, the frozen base needs no weight gradients), params = the decoder's weights (no
embedding lookup, no lm_head), tokens = what the unshared side runs (each distinct prompt once, then the
decoded or scored completion tokens);
against the best of a few square matmuls in the same dtype and threads. The shared side does less
work for the same tokens, so its fraction is "effective" and can pass 1. bf16 runs only where
/proc/cpuinfo lists avx512_bf16 or amx_bf16 (else it says skipped). JSON goes to bench/out/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fst  # noqa: E402
from plumbing import models  # noqa: E402
import pool  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402

PHASES = ("sample", "base", "train")
# Shape options: the issue's workload, and the smoke test's (--tiny) where the command line leaves them out.
FULL = dict(contexts=[300, 600], k=4, problems=8, group=2, max_new_tokens=64, repeats=3)
SMOKE = dict(contexts=[160, 240], k=2, problems=3, group=2, max_new_tokens=8, repeats=1)
FLOPS_PER_PARAM = {"sample": 2, "base": 2, "train": 4}


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_peak(dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on this process's threads: best of 5 after a warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def tiny_model_folder(root: Path) -> Path:
    """A 2-layer Llama (hidden 64) with SmolLM2's tokenizer, random weights at a decisive scale."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = models.load_tokenizer(models.resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    folder = root / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load(a, dtype: str, tmp: Path):
    """(policy model, tokenizer, config) as fst loads them, in `dtype`."""
    name = [f"model.name={tiny_model_folder(tmp)}"] if a.tiny else []
    cfg = fst.load_config("tiny.yaml", [f"model.dtype={dtype}", *name])
    torch.manual_seed(0)
    model, tok = models.load_model(cfg.model, torch.device("cpu"))
    return model.eval(), tok, cfg


def gold_demo(problem: dict) -> tuple[str, str]:
    """A worked example (question, solution) of a problem, solved by the task's own computation when it
    has one (arithmetic: "9 + 5 - 11 = 3.\nAnswer: 3"), else just its answer line. fast_round.py --demos
    uses it too."""
    work = f"{problem['computation']}.\n" if problem.get("computation") else ""
    return problem["question"], f"{work}Answer: {problem['answer']}"


def build_prompts(tok, cfg, a, target: int) -> tuple[list[list[int]], list[int]]:
    """K contexts of about `target` tokens x B test problems, problem-major -> (prompts, context of each)."""
    task = rewards.make_task(cfg.task)
    problems = task.load("test")[:a.problems]
    train = task.load("train")
    contexts = []
    for k in range(a.k):
        draw, demos = random.Random(k).sample(train, 64), []
        context = pool.Context(cfg.task.system_prompt, (), "turns")
        while len(rollout.encode_chat(tok, context.messages(task, problems[0]))) < target and draw:
            demos.append(gold_demo(draw.pop()))
            context = pool.Context(cfg.task.system_prompt, tuple(demos), "turns")
        contexts.append(context)
    prompts, context_of = [], []
    for problem in problems:
        for k, context in enumerate(contexts):
            prompts.append(rollout.encode_chat(tok, context.messages(task, problem)))
            context_of.append(k)
    return prompts, context_of


def run_phase(phase: str, model, tok, prompts, batch, a, share: bool) -> dict:
    """One timed call of `phase` with sharing on or off -> seconds and its tokens: prompt_tokens (summed
    over the rows) and decode_tokens say both sides did the same work; work_tokens are the tokens the
    unshared side runs through the model (each distinct prompt once, then the decoded or scored tokens)."""
    t0 = time.perf_counter()
    if phase == "sample":
        ro = rollout.sample(model, tok, prompts, [a.group] * len(prompts), max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, generator=torch.Generator().manual_seed(a.seed),
                            share_prefix=share)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "prompt_tokens": sum(map(len, ro.prompt_ids)), "decode_tokens": ro.decode_tokens,
                "work_tokens": sum(map(len, prompts)) + ro.decode_tokens, "prefill_tokens": ro.prefill_tokens,
                "completions": ro.completion_ids}
    if phase == "base":
        with torch.no_grad(), rollout.eval_mode(model), model.disable_adapter():
            for rows in rollout.micro_batches(batch, a.micro_batch):
                rollout.sequence_logprobs(model, batch.rows(rows), a.chunk, share_prefix=share)
    else:
        model.train()
        for rows in rollout.micro_batches(batch, a.micro_batch):
            part = batch.rows(rows)
            logp = rollout.sequence_logprobs(model, part, a.chunk, share_prefix=share)
            (logp * part.completion_mask).sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    return {"seconds": time.perf_counter() - t0, "prompt_tokens": int(batch.attention_mask[:, :batch.prompt_width].sum()),
            "decode_tokens": 0, "work_tokens": sum(map(len, prompts)) + int(batch.completion_mask.sum())}


def bench_case(model, tok, cfg, a, dtype: str, target: int, peak: float, params: int) -> dict:
    prompts, context_of = build_prompts(tok, cfg, a, target)
    plan = rollout.plan_prefixes(prompts)
    print(f"[bench] {dtype}, contexts ~{target}: {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens x G={a.group}; plan: {len(plan.prefixes)} prefix rows of "
          f"<= {max(map(len, plan.prefixes))}, suffixes <= {max(map(len, plan.suffixes))} tokens", file=sys.stderr)
    warm = argparse.Namespace(**{**vars(a), "max_new_tokens": 2})
    off = rollout.sample(model, tok, prompts, [a.group] * len(prompts), max_new_tokens=a.max_new_tokens,
                         temperature=a.temperature, generator=torch.Generator().manual_seed(a.seed),
                         share_prefix=False)  # the rows both scoring phases read
    batch = rollout.collate(off.prompt_ids, off.completion_ids, tok.pad_token_id, "cpu")
    phases = {}
    for phase in PHASES:
        for share in (True, False):
            run_phase(phase, model, tok, prompts, batch, warm, share)
        reps = []
        for r in range(a.repeats):
            row = {}
            for share in ((True, False) if r % 2 == 0 else (False, True)):
                row["on" if share else "off"] = run_phase(phase, model, tok, prompts, batch, a, share)
            on, off_ = row["on"], row["off"]
            row["equal_tokens"] = (on["prompt_tokens"], on["decode_tokens"]) == (off_["prompt_tokens"], off_["decode_tokens"])
            row["ratio"] = on["seconds"] / off_["seconds"] if row["equal_tokens"] else None
            if phase == "sample":
                row["same_completions"] = on.pop("completions") == off_.pop("completions")
            for side in ("on", "off"):
                x = row[side]
                x["tokens_per_s"] = x["work_tokens"] / x["seconds"]
                x["fraction_of_bound"] = x["tokens_per_s"] * FLOPS_PER_PARAM[phase] * params / peak
            reps.append(row)
            print(f"  {dtype} ~{target} {phase:>6} rep {r}: on {on['seconds']:.2f}s, off {off_['seconds']:.2f}s"
                  + (f", on/off {row['ratio']:.2f}" if row["ratio"] is not None else ", tokens differ: no ratio"),
                  file=sys.stderr)
        ratios = [x["ratio"] for x in reps if x["ratio"] is not None]
        med = lambda side, key: statistics.median(x[side][key] for x in reps)  # noqa: E731
        phases[phase] = {"repeats": reps, "ratio": statistics.median(ratios) if ratios else None,
                         "pairs_equal_tokens": sum(x["equal_tokens"] for x in reps),
                         "pairs_same_completions": sum(x.get("same_completions", True) for x in reps),
                         **{f"{side}_{key}": med(side, key) for side in ("on", "off")
                            for key in ("seconds", "tokens_per_s", "fraction_of_bound")}}
    return {"dtype": dtype, "context_tokens": target, "prompts": len(prompts), "context_of": context_of,
            "prompt_lengths": [len(p) for p in prompts], "prefix_rows": [len(p) for p in plan.prefixes],
            "suffix_lengths": [len(s) for s in plan.suffixes], "phases": phases}


def bench_dtype(a, dtype: str) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="prefix_sharing_") as tmp:
        model, tok, cfg = load(a, dtype, Path(tmp))
    params = sum(p.numel() for n, p in model.get_decoder().named_parameters() if "embed_tokens" not in n)
    peak = matmul_peak(getattr(torch, dtype), a.matmul_size)
    print(f"[bench] {dtype}: {params / 1e6:.1f}M decoder parameters, matmul peak {peak / 1e9:.1f} GFLOP/s",
          file=sys.stderr)
    return [bench_case(model, tok, cfg, a, dtype, target, peak, params) | {"matmul_peak_flops": peak,
                                                                          "decoder_params": params}
            for target in a.contexts]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M (smoke test)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    ap.add_argument("--contexts", nargs="+", type=int, help=f"context sizes in tokens ({FULL['contexts']})")
    ap.add_argument("--k", type=int, help=f"contexts, i.e. pool members ({FULL['k']})")
    ap.add_argument("--problems", type=int, help=f"B problems ({FULL['problems']})")
    ap.add_argument("--group", type=int, help=f"G samples per (context, problem) prompt ({FULL['group']})")
    ap.add_argument("--max-new-tokens", type=int, help=f"({FULL['max_new_tokens']})")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy: both sides decode the same tokens")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per scoring pass (tiny config: 8)")
    ap.add_argument("--chunk", type=int, default=64, help="completion positions per lm_head chunk")
    ap.add_argument("--repeats", type=int, help=f"alternating on/off pairs per phase, median ({FULL['repeats']})")
    ap.add_argument("--matmul-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-shared", type=int, default=None,
                    help="rollout.MIN_SHARED_PREFIX for this run: measure the threshold with short --contexts "
                         f"(default: the module's, {rollout.MIN_SHARED_PREFIX})")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="folder for the JSON")
    a = ap.parse_args()
    if a.min_shared is not None:
        rollout.MIN_SHARED_PREFIX = a.min_shared
    for key, value in (SMOKE if a.tiny else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.threads:
        torch.set_num_threads(a.threads)
    started, results, skipped = time.perf_counter(), [], {}
    for dtype in a.dtypes:
        if dtype == "bfloat16" and not cpu_has_bf16():
            skipped[dtype] = "no avx512_bf16 or amx_bf16 in /proc/cpuinfo"
            print(f"[bench] bfloat16 skipped: {skipped[dtype]}", file=sys.stderr)
            continue
        results += bench_dtype(a, dtype)
    summary = {"settings": {k: v for k, v in vars(a).items() if k != "out"} | {
                   "threads_used": torch.get_num_threads(), "min_shared_prefix": rollout.MIN_SHARED_PREFIX},
               "results": results, "skipped": skipped, "wall_seconds": time.perf_counter() - started}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"prefix_sharing-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    path.write_text(json.dumps(summary, indent=1))

    print(f"\n{'dtype':>9} {'ctx':>4} {'phase':>6} {'on s':>7} {'off s':>7} {'on/off':>6} {'equal':>5} {'same':>4} "
          f"{'on tok/s':>9} {'off tok/s':>9} {'on bound':>8} {'off bound':>9}")
    for r in results:
        for phase, x in r["phases"].items():
            ratio = f"{x['ratio']:.2f}" if x["ratio"] is not None else "-"
            n = len(x["repeats"])
            print(f"{r['dtype']:>9} {r['context_tokens']:>4} {phase:>6} {x['on_seconds']:>7.2f} {x['off_seconds']:>7.2f} "
                  f"{ratio:>6} {x['pairs_equal_tokens']:>3}/{n} {x['pairs_same_completions']:>2}/{n} "
                  f"{x['on_tokens_per_s']:>9.0f} {x['off_tokens_per_s']:>9.0f} "
                  f"{x['on_fraction_of_bound']:>8.3f} {x['off_fraction_of_bound']:>9.3f}")
    for dtype, why in skipped.items():
        print(f"{dtype:>9} skipped: {why}")
    print("on/off: median wall-time ratio over the pairs with equal tokens (< 1: sharing is faster); equal: pairs "
          "whose sides produced the same prompt and decode tokens; same: pairs with the same completions; bound: "
          "tokens/s as a fraction of the matmul peak at 2 (sample, base) or 4 (train) FLOPs per decoder "
          f"parameter and token -> {path}")
    print(json.dumps({"json": str(path)}))


if __name__ == "__main__":
    main()
