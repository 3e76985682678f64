"""bench/gpu_session_probe.py -- one job: stage 2 of bench/gpu_session.sh, a seconds-long probe of the
device bugs a CPU cannot see, through the project's own functions on a toy model with the real vocabulary.

    python bench/gpu_session_probe.py --out bench/out/gpu            # on a CUDA GPU (4-bit when bitsandbytes imports)
    python bench/gpu_session_probe.py --smoke --out /tmp/probe       # the same checks on a CPU, fp32

The model: gpu_check.py's toy Qwen2 shapes (2 layers, hidden 64) with Qwen's 151936-token vocabulary,
random init, loaded by models.load_model as the recipe loads it (bf16, NF4 4-bit when bitsandbytes
imports, LoRA, gradient checkpointing). No tokenizer is needed: prompts are token ids, K=2 contexts of
100 and 72 tokens (over rollout.MIN_SHARED_PREFIX) under 3 problems of 6-17 tokens, G=2 completions of
5-24 tokens each, so the two-pass log-prob path lays rows out as [pad|prefix|pad|suffix] and the
completions are right-padded. The experience is built by fst.experience_from (its group tensor on the
CPU, as the loop has it). Each check runs on its own and records ok or its error; the script carries on
and exits 1 when any failed. Writes one JSON (probe.json) with every check's result and numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (puts the project root on sys.path)
import fst  # noqa: E402
from plumbing import guards, models  # noqa: E402
import rollout  # noqa: E402

CONTEXT_TOKENS, SUFFIX_TOKENS, GROUP = (100, 72), (6, 11, 17), 2


class Checks:
    """Named checks that each pass or fail on their own; a failure records its error and the line of the
    project's code it came from, and the next check runs."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            details = fn() or {}
            self.results[name] = {"ok": True, **details}
        except Exception as e:  # a probe reports every failure, it does not stop at the first
            frames = [f for f in traceback.extract_tb(e.__traceback__) if "bench" not in Path(f.filename).parts]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
            self.results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "where": where}
        self.results[name]["seconds"] = round(time.perf_counter() - t0, 3)
        mark = "ok" if self.results[name]["ok"] else f"FAILED {self.results[name]['error']}"
        print(f"[probe] {name}: {mark}", file=sys.stderr)


def make_rollouts(seed: int = 0):
    """Token-id prompts (context + problem) and completions, as rollout.sample would return them, with
    the sampler log-probs left empty (filled by the caller): (Rollouts, group [R], problems)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(0, gpu_check.PAD_ID) for _ in range(n)]  # noqa: E731
    contexts, problems = [ids(n) for n in CONTEXT_TOKENS], [ids(n) for n in SUFFIX_TOKENS]
    ro, group = rollout.Rollouts(), []
    for g, problem in enumerate(problems):  # a group = one problem under every context (FST mixes them)
        for c, context in enumerate(contexts):
            for _ in range(GROUP):
                ro.prompt_index.append(len(ro.prompt_index))
                ro.prompt_ids.append(context + problem)
                ro.completion_ids.append(ids(rng.randint(5, 24)))
                ro.finish_reasons.append("length")
                ro.texts.append("")
                group.append(g)
    return ro, group, [{"id": g} for g in range(len(problems))]


def tolerance(dtype: torch.dtype) -> float:
    """How far two passes over the same tokens may differ in log-prob (bf16 rounds differently per path)."""
    return 1e-4 if dtype == torch.float32 else 0.1


def masked_max_diff(a, b, mask) -> float:
    return float(((a.float() - b.float()).abs() * mask).max())


@dataclass
class Setup:
    """What every check reads: the loaded model and the experience built from make_rollouts."""
    model: Any
    tok: Any
    mcfg: models.ModelConfig
    exp: fst.Experience
    ro: rollout.Rollouts
    device: torch.device
    tol: float
    root: Path                 # a temp folder (the saved model, the adapter)
    max_new_tokens: int

    @property
    def mask(self) -> torch.Tensor:
        return self.exp.batch.completion_mask


def set_up(a, device: torch.device, dtype: str, quant: str) -> Setup:
    """The toy model loaded as the recipe loads it, and the experience fst.experience_from makes of
    make_rollouts' rows (sampler log-probs: one plain no-grad pass in eval mode; the sampler's own: `sample`)."""
    root = Path(tempfile.mkdtemp(prefix="gpu-probe-"))
    folder = gpu_check.build_folder("smoke", root, "cpu")
    mcfg = models.ModelConfig(name=str(folder), dtype=dtype, quant=quant, lora_r=8, lora_alpha=16,
                              lora_targets="all-linear", gradient_checkpointing=True)
    model, tok = models.load_model(mcfg, device)
    ro, group, problems = make_rollouts()
    plain = rollout.collate(ro.prompt_ids, ro.completion_ids, gpu_check.PAD_ID, device)
    with torch.no_grad(), rollout.eval_mode(model):
        single = rollout.sequence_logprobs(model, plain, share_prompts=False)
    ro.logprobs = [single[r, :len(c)].tolist() for r, c in enumerate(ro.completion_ids)]
    scored = [(float((r // GROUP) % 2), "") for r in range(len(group))]  # mixed rewards in every group
    exp = fst.experience_from(problems, group, [0] * len(group), ro, scored, scale_by_std=True,
                              pad_id=gpu_check.PAD_ID, device=device)
    return Setup(model=model, tok=tok, mcfg=mcfg, exp=exp, ro=ro, device=device, tol=tolerance(getattr(torch, dtype)),
                 root=root, max_new_tokens=a.max_new_tokens)


def check_layout(s: Setup) -> dict:
    """The prompts take the two-pass path, and its rows have padding before the prefix and the suffix."""
    plan = rollout.plan_prefixes([list(u) for u in dict.fromkeys(map(tuple, s.ro.prompt_ids))])
    assert plan.shares, "the prompts do not take the shared-prefix path"
    lens = lambda rows: sorted({len(r) for r in rows})  # noqa: E731
    assert len(lens(plan.prefixes)) > 1 and len(lens(plan.suffixes)) > 1, "no padding inside the rows"
    return {"prefix_lengths": lens(plan.prefixes), "suffix_lengths": lens(plan.suffixes), "rows": len(s.exp.group),
            "mask_device": str(s.mask.device), "group_device": str(s.exp.group.device)}


def check_normalisers(s: Setup) -> dict:
    """Every loss's weights with the mask on the device: the group as experience_from builds it, then
    moved to the device; on the mask's device and equal to the all-CPU weights."""
    sums = {}
    for name in fst.LOSSES:
        want = fst.token_weights(name, s.mask.cpu(), s.exp.group.cpu(), s.max_new_tokens)
        for label, group in (("group_as_built", s.exp.group), ("group_on_device", s.exp.group.to(s.device))):
            w = fst.token_weights(name, s.mask, group, s.max_new_tokens)
            assert w.device == s.mask.device, f"{name} ({label}): weights on {w.device}, mask on {s.mask.device}"
            assert torch.isfinite(w).all() and torch.allclose(w.cpu(), want, atol=1e-6), f"{name} ({label})"
        sums[name] = round(float(want.sum()), 6)
    return {"weight_sums": sums}


def check_sharing_guard(s: Setup) -> dict:
    """rollout._can_share_prompts: off in train mode (checkpointing drops the cache), on in eval mode."""
    body, modes = s.model.get_decoder(), {}
    for mode in ("train", "eval"):
        getattr(s.model, mode)()
        modes[mode] = rollout._can_share_prompts(body)
    s.model.eval()
    assert modes == {"train": False, "eval": True}, f"sharing guard {modes}: want train False, eval True"
    flags = {k: getattr(s.model, k, None) for k in ("is_activation_checkpointing", "is_gradient_checkpointing")}
    return {"can_share": modes, **{k: v for k, v in flags.items() if isinstance(v, bool)}}


def check_shared_vs_single(s: Setup) -> dict:
    """Log-probs of the two-pass path = the single pass, and in train mode (the guard's single pass) too."""
    with torch.no_grad(), rollout.eval_mode(s.model):
        shared = rollout.sequence_logprobs(s.model, s.exp.batch, share_prompts=True)
        unshared = rollout.sequence_logprobs(s.model, s.exp.batch, share_prompts=False)
    s.model.train()
    with torch.no_grad():
        in_train = rollout.sequence_logprobs(s.model, s.exp.batch, share_prompts=True)
    s.model.eval()
    diffs = {"shared_vs_single": masked_max_diff(shared, unshared, s.mask),
             "train_mode_vs_single": masked_max_diff(in_train, unshared, s.mask)}
    assert all(d <= s.tol for d in diffs.values()), f"log-probs differ beyond {s.tol}: {diffs}"
    return {"max_abs_diff": diffs}


def check_finite_at_pads(s: Setup) -> dict:
    """No NaN/inf anywhere, pad positions included: hidden states, logits at pads, the two-pass outputs."""
    batch, body = s.exp.batch, s.model.get_decoder()
    with torch.no_grad(), rollout.eval_mode(s.model):
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      use_cache=False).last_hidden_state                                       # [R, P+T, H]
        pads = batch.attention_mask == 0
        pad_logits = s.model.get_output_embeddings()(hidden[pads][:64]).float()                 # [<=64, V]
        shared_h = rollout.completion_hidden_states(s.model, batch, share_prompts=True)         # [R, T, H]
        logp = rollout.sequence_logprobs(s.model, batch, share_prompts=True)                    # [R, T]
    bad = {name: int((~torch.isfinite(x)).sum()) for name, x in
           (("hidden", hidden), ("pad_logits", pad_logits), ("two_pass_hidden", shared_h), ("logprobs", logp))}
    assert not any(bad.values()), f"non-finite values: {bad}"
    return {"pad_positions": int(pads.sum())}


def check_sample(s: Setup) -> dict:
    """rollout.sample on the shared-prefix prompts in waves of 4 rows: every row, finite log-probs <= 0."""
    prompts = [list(p) for p in dict.fromkeys(map(tuple, s.ro.prompt_ids))]
    out = rollout.sample(s.model, s.tok, prompts, [GROUP] * len(prompts), max_new_tokens=8, max_rows=4,
                         generator=torch.Generator(device=s.device).manual_seed(0))
    assert len(out.texts) == GROUP * len(prompts), f"{len(out.texts)} rows"
    assert all(len(lp) == len(c) and all(x == x and x <= 0 for x in lp)
               for lp, c in zip(out.logprobs, out.completion_ids)), "sampler log-probs not finite / not <= 0"
    return {"rows": len(out.texts), "prefill_tokens": out.prefill_tokens, "decode_tokens": out.decode_tokens}


def check_update(s: Setup) -> dict:
    """Steps 5-6 as fst.train runs them: base log-probs, KL, one guarded update that moves the LoRA weights."""
    tc = fst.TrainConfig(loss="cispo", micro_batch=4, logprob_chunk=16, lr=1e-3)
    optimizer, scheduler = fst.make_optimizer(s.model, tc)
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    base_logp = fst.base_logprobs(s.model, s.exp.batch, tc.micro_batch, tc.logprob_chunk)
    kl = fst.mean_kl(s.exp, base_logp)
    upd = fst.update(s.model, optimizer, scheduler, s.exp, base_logp, tc, s.max_new_tokens, guards.UpdateGuard(),
                     step=0)
    s.model.eval()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(trainable, before))
    assert upd.skipped is None and upd.rows == len(s.exp.group), f"update skipped: {upd.skipped}, rows {upd.rows}"
    assert torch.isfinite(torch.tensor([upd.loss, kl])).all() and moved > 0, f"loss {upd.loss}, moved {moved}"
    return {"loss": upd.loss, "kl": kl, "ratio_dev": upd.ratio_dev, "max_weight_change": moved}


def check_save_and_reload(s: Setup) -> dict:
    """The adapter saved and loaded by models.load_model (as --resume does) gives the same log-probs."""
    adapter = s.root / "adapter"
    s.model.save_pretrained(adapter)
    again, _ = models.load_model(s.mcfg, s.device, adapter_path=str(adapter))
    with torch.no_grad(), rollout.eval_mode(s.model), rollout.eval_mode(again):
        mine = rollout.sequence_logprobs(s.model, s.exp.batch)
        theirs = rollout.sequence_logprobs(again, s.exp.batch)
    diff = masked_max_diff(mine, theirs, s.mask)
    del again
    assert diff <= s.tol, f"the reloaded adapter's log-probs differ by {diff}"
    return {"max_abs_diff": diff, "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir())}


def check_left_pad_training(s: Setup) -> dict:
    """The training pass (train mode, gradients) of the left-padded rows on SDPA: finite log-probs and LoRA
    gradients, with models.keep_pad_rows_finite's hooks in place; says whether this device's SDPA itself
    gives NaN at a query row that may attend to nothing (what the hooks are there for)."""
    q = torch.randn(1, 1, 3, 8, device=s.device, dtype=torch.bfloat16 if s.device.type == "cuda" else torch.float32)
    nobody = torch.tensor([[False, False, False], [True, True, False], [True, True, True]], device=s.device)
    raw = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=nobody)
    model, _ = models.load_model(dataclasses.replace(s.mcfg, attn="sdpa"), s.device)
    hooked = sum(bool(m._forward_pre_hooks) for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    model.train()
    logp = rollout.sequence_logprobs(model, s.exp.batch, chunk_size=16)                          # [R, T]
    logp[s.mask.bool()].sum().backward()
    bad = int((~torch.isfinite(logp[s.mask.bool()])).sum()) + sum(
        int((~torch.isfinite(p.grad)).sum()) for p in model.parameters() if p.grad is not None)
    del model
    assert hooked and not bad, f"{hooked} decoder layers hooked; {bad} non-finite log-probs or gradients"
    return {"sdpa_nan_at_empty_rows": bool(raw[0, 0, 0].isnan().any()), "layers_hooked": hooked,
            "pad_positions": int((s.exp.batch.attention_mask == 0).sum())}


def check_low_temperature(s: Setup) -> dict:
    """rollout._pick at T = 0.05, with and without top-p, on the model's own next-token log-probs (near
    uniform over 151,936 ids: every p^(1/T) underflows unless the row's maximum comes off first): every draw
    is a token the tempered distribution gives probability > 1e-12; rollout.sample at T = 0.05 runs too."""
    prompts = [list(p) for p in dict.fromkeys(map(tuple, s.ro.prompt_ids))]
    with torch.no_grad(), rollout.eval_mode(s.model):
        ids = torch.tensor([p[-70:] for p in prompts], device=s.device)  # equal lengths: no padding
        logp = torch.log_softmax(s.model(input_ids=ids).logits[:, -1].float(), -1).repeat(16, 1)    # [R, V]
    tempered, gen = torch.softmax(logp.double() / 0.05, -1), torch.Generator(device=s.device).manual_seed(0)
    least = {}
    for top_p in (1.0, 0.9):
        tok = rollout._pick(logp, 0.05, top_p, torch.rand(len(logp), generator=gen, device=s.device))
        least[f"top_p={top_p}"] = float(tempered.gather(-1, tok[:, None]).min())
    out = rollout.sample(s.model, s.tok, prompts, [GROUP] * len(prompts), max_new_tokens=4, temperature=0.05,
                         generator=gen)
    assert all(p > 1e-12 for p in least.values()), f"draws the tempered distribution never gives: {least}"
    return {"mean_max_logprob": float(logp.max(-1).values.mean()), "least_likely_draw": least, "rows": len(out.texts)}


def check_fp32_head_cost(s: Setup) -> dict:
    """The float32 head's time per decode step against the plain bf16 head's: B x G = 64 rows at
    Qwen2.5-1.5B's head ([151,936, 1536], frozen) on a GPU; toy width on a CPU (there: only that it runs)."""
    width, dtype = (1536, torch.bfloat16) if s.device.type == "cuda" else (64, torch.float32)
    head = torch.nn.Linear(width, 151936, bias=False, device=s.device, dtype=dtype).requires_grad_(False)
    fp32, h = models.Float32Head(head), torch.randn(64, width, device=s.device, dtype=dtype)

    def ms(fn) -> float:
        fn(h)  # warm-up
        t0 = gpu_check.clock()
        for _ in range(10):
            fn(h)
        return (gpu_check.clock() - t0) * 100
    plain, upcast = ms(head), ms(fp32)
    assert fp32(h).dtype == torch.float32
    return {"bf16_head_ms": round(plain, 4), "fp32_head_ms": round(upcast, 4), "ratio": round(upcast / plain, 2),
            "float32_out_mm": models.float32_out_mm(s.device, dtype)}


CHECKS = {"layout": check_layout, "normalisers": check_normalisers, "sharing_guard": check_sharing_guard,
          "shared_vs_single_pass": check_shared_vs_single, "finite_at_pads": check_finite_at_pads,
          "sample": check_sample, "update": check_update, "save_and_reload": check_save_and_reload,
          "left_pad_training": check_left_pad_training, "low_temperature": check_low_temperature,
          "fp32_head_cost": check_fp32_head_cost}


def probe(a) -> dict:
    device = torch.device("cuda" if not a.smoke else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    quant = a.quant if a.quant != "auto" else ("4bit" if bnb else "none")  # as gpu_check.py picks it
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": dtype,
              "quant": quant, "quant_note": "" if quant == "4bit" else
              ("bitsandbytes is not installed: 4-bit skipped" if not bnb else "4-bit off (--quant none)")}
    s = set_up(a, device, dtype, quant)
    try:
        report["model"] = {"vocab": s.model.config.vocab_size, "attn": s.model.config._attn_implementation,
                           "tolerance": s.tol}
        checks = Checks()
        for name, fn in CHECKS.items():
            checks.run(name, lambda: fn(s))
        report["checks"] = checks.results
    finally:
        shutil.rmtree(s.root, ignore_errors=True)
    if device.type == "cuda":
        report["peak_gib"], report["peak_reserved_gib"] = gpu_check.peak_gib()
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(gpu_check.ROOT / "bench" / "out" / "gpu"))
    ap.add_argument("--smoke", action="store_true", help="on the CPU in fp32 (CI's self-test of this script)")
    ap.add_argument("--quant", choices=["auto", "4bit", "none"], default="auto",
                    help="auto: NF4 4-bit where bitsandbytes is installed, else none")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="the normalisers' max_new_tokens")
    a = ap.parse_args()
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_session_probe.py needs a CUDA GPU (none visible); on a CPU use --smoke")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    report = probe(a)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "probe.json").write_text(json.dumps(report, indent=1))
    failed = [n for n, r in report["checks"].items() if not r["ok"]]
    print(json.dumps({"failed": failed, "json": str(Path(a.out) / "probe.json")}))
    if failed:
        raise SystemExit(f"[probe] {len(failed)} of {len(report['checks'])} checks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
