"""bench/behaviour_logp.py -- one job: how far the sampler's log-probs (the loss's old_logp since fast.reuse)
are from the training forward's on fresh rollouts, and what that changes in the first update.

    python bench/behaviour_logp.py                      # tiny config (SmolLM2-135M): fp32, and bf16 where the CPU has it
    python bench/behaviour_logp.py --dtypes float32 --steps 3
    python bench/behaviour_logp.py --decompose                # bf16: where the gap comes from, one switch at a time

For each dtype: a run of configs/tiny.yaml (mode rl, as fst.py starts it, in a temp folder), the rollouts
of its first --steps steps (fst.make_experience: B x G rows, the sampler's log-probs recorded), then, as
fst.update does, the training forward in train mode over the same rows with the weights that sampled them.
Reports the median, 99th percentile and max of |exp(logp - sampler_logp) - 1| over completion tokens, and
the first update's gradient with old_logp = the sampler's (now) against old_logp = logp.detach() (before:
ratio exactly 1): the relative L2 difference of the two gradients and their cosine. No optimiser step is
taken, so every step's rows are fresh. Writes bench/out/behaviour_logp.json.

--decompose (bf16, the tiny config): the same rows' log-probs from each pass, compared pairwise, with the
head in bf16 and in float32 (model.fp32_head): the sampler (prefill for a completion's first token, cached
decode for the rest), one no-grad pass in eval mode over the whole sequence (shared prompts, as training
runs it; and a plain single pass), and the training pass (train mode). Each row of the table switches one
thing, so the p99 of |ratio - 1| says how much of the gap each one carries. Writes
bench/out/behaviour_logp_decompose.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fst  # noqa: E402
from plumbing import seeds  # noqa: E402
import rollout  # noqa: E402


def has_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gradient(run, exp, base_logp, tc, max_new_tokens, old_logp_of) -> torch.Tensor:
    """The flattened LoRA gradient of the step's loss (fst.update's micro-batch loop, no optimiser step)."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    rows = exp.keep[exp.group].nonzero().view(-1)
    weights = fst.token_weights(tc.loss, exp.batch.completion_mask[rows], exp.group[rows], max_new_tokens)
    for s in range(0, len(rows), tc.micro_batch):
        r = rows[s:s + tc.micro_batch]
        logp = rollout.sequence_logprobs(run.model, exp.batch.rows(r), tc.logprob_chunk)
        fst.policy_loss(tc, logp, old_logp_of(logp, r), exp.advantage[r], exp.batch.completion_mask[r],
                        weights[s:s + tc.micro_batch], base_logp=base_logp[r]).backward()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


def measure(dtype: str, steps: int, model: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="fst-behaviour-") as tmp:
        sets = [f"model.dtype={dtype}", "mode=rl", "eval.every=0", f"out_dir={tmp}"] + ([f"model.name={model}"] if model else [])
        cfg = fst.load_config("tiny.yaml", sets)
        run = fst.start_run(cfg, Path(tmp) / "run")
        deviations, relative, cosine = [], [], []
        for step in range(steps):
            task, stream = run.stage(step)
            seeds.seed_everything(seeds.seed_for("step", cfg.train.seed, step))
            exp = fst.make_experience(cfg, run, task, stream.next_batch(), step)
            base_logp = fst.base_logprobs(run.model, exp.batch, cfg.train.micro_batch, cfg.train.logprob_chunk)
            run.model.train()
            with torch.no_grad():
                logp = rollout.sequence_logprobs(run.model, exp.batch, cfg.train.logprob_chunk)
            mask = exp.batch.completion_mask.bool()
            deviations.append(((logp - exp.sampler_logp).exp() - 1).abs()[mask].float())
            if not exp.keep.any():
                continue  # every group's rewards equal: no update to compare
            now = gradient(run, exp, base_logp, cfg.train, cfg.sampling.max_new_tokens,
                           lambda lp, r: exp.sampler_logp[r])
            before = gradient(run, exp, base_logp, cfg.train, cfg.sampling.max_new_tokens, lambda lp, r: lp.detach())
            relative.append(((now - before).norm() / before.norm()).item())
            cosine.append(torch.nn.functional.cosine_similarity(now, before, dim=0).item())
        dev = torch.cat(deviations)
        return {"dtype": dtype, "steps": steps, "tokens": dev.numel(), "median_abs_ratio_minus_1": dev.median().item(),
                "p99_abs_ratio_minus_1": dev.quantile(0.99).item(), "max_abs_ratio_minus_1": dev.max().item(),
                "updates_compared": len(relative), "gradient_relative_difference": relative, "gradient_cosine": cosine}


def p99(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """p99 over masked tokens of |exp(a - b) - 1|."""
    return ((a - b).exp() - 1).abs()[mask.bool()].float().quantile(0.99).item()


def decompose(fp32_head: bool, steps: int, model: str | None, overrides=()) -> dict:
    """Each pass's log-probs of the same fresh rows (bf16 body), and the gaps between them."""
    with tempfile.TemporaryDirectory(prefix="fst-decompose-") as tmp:
        sets = ["model.dtype=bfloat16", f"model.fp32_head={fp32_head}", "mode=rl", "eval.every=0",
                f"out_dir={tmp}"] + ([f"model.name={model}"] if model else []) + list(overrides)
        cfg = fst.load_config("tiny.yaml", sets)
        run = fst.start_run(cfg, Path(tmp) / "run")
        passes, masks = {k: [] for k in ("sampler", "eval_shared", "eval_single", "train")}, []
        for step in range(steps):
            task, stream = run.stage(step)
            seeds.seed_everything(seeds.seed_for("step", cfg.train.seed, step))
            exp = fst.make_experience(cfg, run, task, stream.next_batch(), step)
            with torch.no_grad():
                with rollout.eval_mode(run.model):
                    eval_shared = rollout.sequence_logprobs(run.model, exp.batch, cfg.train.logprob_chunk)
                    eval_single = rollout.sequence_logprobs(run.model, exp.batch, cfg.train.logprob_chunk,
                                                            share_prompts=False, share_prefix=False)
                run.model.train()
                train = rollout.sequence_logprobs(run.model, exp.batch, cfg.train.logprob_chunk)
            for key, lp in zip(passes, (exp.sampler_logp, eval_shared, eval_single, train)):
                passes[key].append(lp.float())
            masks.append(exp.batch.completion_mask)
        width = max(m.shape[1] for m in masks)  # steps differ in completion length: pad to one width
        pad = lambda ts: torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts])  # noqa: E731
        lp, mask = {k: pad(v) for k, v in passes.items()}, pad(masks)
        first = torch.zeros_like(mask)
        first[:, 0] = mask[:, 0]  # a completion's first token: the sampler's prefill pass
        return {"fp32_head": fp32_head, "overrides": list(overrides), "tokens": int(mask.sum()),
                "train_vs_sampler": p99(lp["train"], lp["sampler"], mask),
                "train_vs_sampler_prefill_token": p99(lp["train"], lp["sampler"], first),
                "train_vs_sampler_decode_tokens": p99(lp["train"], lp["sampler"], mask - first),
                "eval_pass_vs_sampler": p99(lp["eval_shared"], lp["sampler"], mask),
                "train_vs_eval_pass": p99(lp["train"], lp["eval_shared"], mask),
                "shared_vs_single_pass": p99(lp["eval_shared"], lp["eval_single"], mask)}


def print_decomposition(results: list[dict]) -> None:
    rows = [("trainer vs sampler (what the loss sees)", "train_vs_sampler"),
            ("... on the first token (sampler: prefill)", "train_vs_sampler_prefill_token"),
            ("... on the others (sampler: cached decode)", "train_vs_sampler_decode_tokens"),
            ("one eval-mode pass vs sampler (decode kernels)", "eval_pass_vs_sampler"),
            ("trainer vs eval-mode pass (train mode)", "train_vs_eval_pass"),
            ("shared-prompt pass vs single pass", "shared_vs_single_pass")]
    heads = " | ".join(f"p99, head {'fp32' if r['fp32_head'] else 'bf16'}" for r in results)
    print(f"| bf16 body: p99 abs(ratio - 1) | {heads} |")
    print("|---|" + "---|" * len(results))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"{r[key]:.2e}" for r in results) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: float32, plus bfloat16 where the CPU has it")
    ap.add_argument("--steps", type=int, default=2, help="steps' batches measured per dtype")
    ap.add_argument("--model", help="model.name (default: the tiny config's smollm2-135m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decompose", action="store_true", help="bf16: the gap pass by pass, head bf16 and fp32")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="--decompose: a config override for both runs, e.g. --set model.attn=eager")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "behaviour_logp.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.decompose:
        results = [decompose(fp32_head, a.steps, a.model, a.set) for fp32_head in (False, True)]
        print_decomposition(results)
        out = Path(a.out).with_name("behaviour_logp_decompose" + "".join(f"_{s}" for s in a.set) + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, "bf16_cpu": has_bf16()}, indent=1))
        return
    dtypes = a.dtypes or ["float32"] + (["bfloat16"] if has_bf16() else [])
    results = [measure(d, a.steps, a.model) for d in dtypes]
    print("| dtype | tokens | median abs(ratio-1) | p99 | max | grad rel. diff (per step) | cosine |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['tokens']} | {r['median_abs_ratio_minus_1']:.2e} | {r['p99_abs_ratio_minus_1']:.2e} "
              f"| {r['max_abs_ratio_minus_1']:.2e} | {', '.join(f'{x:.2e}' for x in r['gradient_relative_difference'])} "
              f"| {', '.join(f'{x:.6f}' for x in r['gradient_cosine'])} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"results": results, "bf16_cpu": has_bf16()}, indent=1))


if __name__ == "__main__":
    main()
