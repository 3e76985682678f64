"""bench/gpu_check.py -- one job: the gsm8k recipe's GPU numbers on one lent GPU, in minutes, no downloads.

    python bench/gpu_check.py                        # Qwen2.5-1.5B shapes, + Qwen3-8B shapes if bitsandbytes
    python bench/gpu_check.py --cpu-smoke            # the same code path at toy shapes on a CPU (a self-test)
    python bench/gpu_check.py --models qwen2.5-1.5b --prompt-mode contexts --val-problems 200
                                                     # bench/gpu_session.sh's stage 3

Models are random-init from config objects with the real shapes, saved to a temp folder with a tokenizer
built in code (a `tokenizers` WordLevel vocabulary "t0".."t151935" whose ids 151643/151645 are Qwen's
<|endoftext|> (pad) / <|im_end|> (EOS)), then loaded by models.load_model exactly as the recipe does: NF4 4-bit
base with double quantisation, bf16 compute, LoRA r=16 on all linear layers, gradient checkpointing.
Prompts are random token-id lists (120-200 tokens); a random-init model almost never samples EOS, so every
rollout runs to max_new_tokens: the worst case for time and memory. Reported, as one JSON:
  decode bound: bytes read per decode step (quantised weights + LoRA + lm_head; KV cache at the mean
      context separately) over the copy bandwidth of a big device-to-device copy -> tokens/s ceiling;
  sampler: rollout.sample tokens/s vs model.generate (prompts repeat_interleave'd, attention mask, cache);
  step: one fst RL step (sample B*G=64 x 512 tokens, rewards drawn at random with both outcomes in every
      group, base no-grad pass for KL, CISPO update in micro-batches of 8) run by the phase functions
      fst.train calls (rollout.sample, fst.experience_from, fst.base_logprobs, fst.mean_kl, fst.update),
      seconds per phase and peak allocated (and reserved) GPU memory per phase vs the 22 GiB budget;
  validation (--val-problems N > 0): one sampler call of N problems x --val-k samples in waves of
      --max-rows rows, as fst.validate makes it: seconds, waves, peak allocated and reserved memory;
  the memory plan (plumbing/plan.py) of each phase beside its peak reserved memory, and again for one step
      and one validation wave at --alloc-tokens with the allocator's expandable segments on, then off;
  the truncated importance weights (train.tis_cap 2, as the recipe) of the step: mean about 1, none capped.
--prompt-mode contexts: the step's and validation's prompts are one of --contexts shared contexts
(--context-tokens each, 100+) and then a problem of their own, as FST's rollouts are, so the sampler
and the training passes run the shared-prefix path (rollout.plan_prefixes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import guards, models, plan  # noqa: E402
import fst  # noqa: E402
import rollout  # noqa: E402

PAD_ID, EOS_ID, GIB = 151643, 151645, 2**30
SHAPES = {  # the real shapes; vocab 151936 everywhere
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                         num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                                     tie_word_embeddings=False)),
    "smoke": ("Qwen2Config", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> float:
    sync()
    return time.perf_counter()


def peak_gib(reset: bool = False) -> tuple[float | None, float | None]:
    """(peak allocated, peak reserved) GiB since the last reset; (None, None) without CUDA."""
    if not torch.cuda.is_available():
        return None, None
    allocated, reserved = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(allocated, 3), round(reserved, 3)


# A Qwen-style chat template for the in-code tokenizer, so fst.py can run on the folder (its special tokens
# are Qwen's ids; the words between them are whitespace-split).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def build_folder(name: str, root: Path, device: str, words: list[str] = ()) -> Path:
    """Random-init model of `name`'s shapes (bf16, built on `device`) + an in-code tokenizer with a chat
    template, saved. `words` take the ids after t0 (else every id i is the word "t<i>"), so text made of
    them encodes to distinct tokens (bench/gpu_session_e2e.py's synthetic GSM8K)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    cls, shape = SHAPES[name]
    config = getattr(transformers, cls)(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                                        rms_norm_eps=1e-6, bos_token_id=PAD_ID, eos_token_id=EOS_ID,
                                        pad_token_id=PAD_ID, **shape)
    folder = root / name
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    special = {PAD_ID: "<|endoftext|>", EOS_ID - 1: "<|im_start|>", EOS_ID: "<|im_end|>"}
    named = dict(enumerate(dict.fromkeys(w for w in words if w not in special.values()), start=1))
    vocab = {special.get(i) or named.get(i) or f"t{i}": i for i in range(config.vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=special[EOS_ID], pad_token=special[PAD_ID],
                                   additional_special_tokens=[special[EOS_ID - 1]])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def decode_bytes(model) -> int:
    """Bytes a decode step reads: every stored parameter once (4-bit packed + absmax stats), minus the
    input embedding when it is not tied to lm_head (a lookup reads one row)."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    for p in model.parameters():
        if p.data_ptr() in seen or (p is emb and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted), best of 5 after a warm-up."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        t0 = clock()
        y.copy_(x)
        best = min(best, clock() - t0)
    del x, y
    return 2 * nbytes / best


def make_prompts(n: int, seed: int, lo: int = 120, hi: int = 200, contexts: int = 0,
                 context_tokens: int = 0) -> list[list[int]]:
    """n random token-id prompts of lo..hi tokens; with contexts > 0, prompt i is context i % contexts
    (context_tokens random tokens, the same for every prompt that uses it) and then lo..hi tokens of its own."""
    rng = random.Random(seed)
    shared = [[rng.randrange(0, PAD_ID) for _ in range(context_tokens)] for _ in range(contexts)]
    return [(shared[i % contexts] if contexts else []) + [rng.randrange(0, PAD_ID) for _ in range(rng.randint(lo, hi))]
            for i in range(n)]


def prompts_for(a, n: int, seed: int) -> list[list[int]]:
    """The step's and validation's prompts as --prompt-mode says: random, or shared contexts + problems."""
    if a.prompt_mode == "contexts":
        return make_prompts(n, seed, 20, 60, a.contexts, a.context_tokens)
    return make_prompts(n, seed)


def validation_call(model, tok, prompts, k: int, new_tokens: int, max_rows: int, device) -> dict:
    """One sampler call as fst.validate makes it: every problem x k samples, in waves of max_rows rows."""
    peak_gib(reset=True)
    t0 = clock()
    ro = rollout.sample(model, tok, prompts, [k] * len(prompts), max_new_tokens=new_tokens, temperature=1.0,
                        max_rows=max_rows, generator=torch.Generator(device=device).manual_seed(7))
    seconds = clock() - t0
    allocated, reserved = peak_gib(reset=True)
    return {"rows": len(ro.texts), "waves": len(rollout.sampling_waves(prompts, [k] * len(prompts), None, max_rows)),
            "max_rows": max_rows, "new_tokens": new_tokens, "prompt_tokens_max": max(map(len, prompts)),
            "prefill_tokens": ro.prefill_tokens, "decode_tokens": ro.decode_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(ro.decode_tokens / seconds, 1), "peak_gib": allocated, "peak_reserved_gib": reserved}


def sampler_vs_generate(model, tok, prompts, G, new_tokens, repeats, device) -> dict:
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (P - len(p)) + p for p in prompts], device=device).repeat_interleave(G, 0)
    mask = (torch.arange(P, device=device)[None] >= torch.tensor([P - len(p) for p in prompts], device=device)[:, None])
    mask = mask.long().repeat_interleave(G, 0)

    def fst_side(n, seed):
        ro = rollout.sample(model, tok, prompts, [G] * len(prompts), max_new_tokens=n, temperature=1.0,
                            generator=torch.Generator(device=device).manual_seed(seed))
        return ro.decode_tokens

    @torch.inference_mode()
    def gen_side(n, seed):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=n, eos_token_id=[EOS_ID], pad_token_id=PAD_ID, use_cache=True)
        new = out[:, P:]
        is_eos = new == EOS_ID
        return int(torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1]).sum())

    model.eval()
    fst_side(8, 0), gen_side(8, 0)  # warm-up
    rows = []
    for r in range(repeats):
        row = {}
        for side, fn in (("fst", fst_side), ("generate", gen_side)):
            t0 = clock()
            n = fn(new_tokens, r + 1)
            row[side] = n / (clock() - t0)
        rows.append(row)
        print(f"  sampler rep {r}: fst {row['fst']:.0f} tok/s, generate {row['generate']:.0f} tok/s", file=sys.stderr)
    med = lambda k: sorted(x[k] for x in rows)[len(rows) // 2]
    return {"rows": len(prompts) * G, "new_tokens": new_tokens, "fst_tokens_per_s": med("fst"),
            "generate_tokens_per_s": med("generate"), "ratio": med("fst") / med("generate")}


def rl_step(model, tok, optimizer, scheduler, guard, prompts, G, new_tokens, mb, chunk=64, kl_coef=1e-3,
            seed=0) -> dict:
    """Steps 2-6 of fst.train for one batch, through the loop's own phase functions, each phase timed
    and memory-measured. Rewards are drawn at random with both outcomes in every group (a random model
    solves nothing), so every rollout is trained on."""
    device = model.get_input_embeddings().weight.device
    B, t, peaks, reserved = len(prompts), {}, {}, {}
    peak_gib(reset=True)
    t0 = t_step = clock()
    ro = rollout.sample(model, tok, prompts, [G] * B, max_new_tokens=new_tokens, temperature=1.0,
                        generator=torch.Generator(device=device).manual_seed(seed))
    t["seconds_sampling"], (peaks["sampling"], reserved["sampling"]) = clock() - t0, peak_gib(reset=True)
    reward = (torch.rand(B, G, generator=torch.Generator().manual_seed(seed)) < 0.5).float()
    reward[:, 0], reward[:, 1] = 1.0, 0.0
    exp = fst.experience_from([{"id": i} for i in range(B)], [g for g in range(B) for _ in range(G)], [0] * B * G,
                              ro, [(r, "") for r in reward.view(-1).tolist()], scale_by_std=True,
                              pad_id=tok.pad_token_id, device=device)
    t0 = clock()
    base_logp = fst.base_logprobs(model, exp.batch, mb, chunk)
    kl = fst.mean_kl(exp, base_logp)
    t["seconds_base_kl"], (peaks["base_kl"], reserved["base_kl"]) = clock() - t0, peak_gib(reset=True)
    t0 = clock()
    tc = fst.TrainConfig(loss="cispo", micro_batch=mb, logprob_chunk=chunk, kl_coef=kl_coef, tis_cap=2.0)
    upd = fst.update(model, optimizer, scheduler, exp, base_logp, tc, new_tokens, guard, step=0)
    t["seconds_training"], (peaks["training"], reserved["training"]) = clock() - t0, peak_gib(reset=True)
    t["seconds_step"] = clock() - t_step
    return {**{k: round(v, 3) for k, v in t.items()}, "tokens_per_s": round(ro.decode_tokens / t["seconds_sampling"], 1),
            "rollouts": len(ro.texts), "trained_rollouts": upd.rows, "update_skipped": upd.skipped,
            "tis_weight": upd.tis_weight, "tis_capped": upd.tis_capped,
            "mean_completion": sum(map(len, ro.completion_ids)) / len(ro.texts),
            "max_seq": int(exp.batch.input_ids.shape[1]), "kl": kl, "loss": upd.loss, "peak_gib_by_phase": peaks,
            "peak_gib": max(v for v in peaks.values()) if peaks["sampling"] is not None else None,
            "peak_reserved_gib_by_phase": reserved,
            "peak_reserved_gib": max(v for v in reserved.values()) if reserved["sampling"] is not None else None}


def plan_gib(a, mcfg, new_tokens: int) -> dict:
    """The memory plan's peaks (GiB, resident weights included) of the step's phases and of one validation
    wave, for this script's settings at `new_tokens` (read while the model's folder still exists)."""
    cfg = fst.load_config("gsm8k.yaml", [
        f"model.name={mcfg.name}", f"model.quant={mcfg.quant}", f"model.dtype={mcfg.dtype}", "model.fp32_head=false",
        f"model.lora_r={mcfg.lora_r}", "mode=rl", f"train.batch_size={a.batch}", f"sampling.group_size={a.group}",
        f"sampling.max_new_tokens={new_tokens}", f"train.micro_batch={a.micro_batch}", "train.logprob_chunk=64",
        f"sampling.max_rows={a.max_rows}", f"eval.n={max(a.val_problems, 1)}", f"eval.k={a.val_k}"])
    mp = plan.memory_plan(cfg, 80 * GIB)
    peaks = {p.name.split(" (")[0]: round(mp.peak(p) / GIB, 3) for p in mp.phases}
    return {"sampling": peaks["RL step sampling"], "base_kl": peaks["base pass"],
            "training": peaks["training micro-batch"], "validation_wave": peaks["validation"]}


def allocator_check(model, tok, a, optimizer, scheduler, guard, planned: dict, device: str) -> dict:
    """One RL step and one validation wave at --alloc-tokens new tokens, with the caching allocator's
    expandable segments on and then off: each phase's peak reserved GiB against the plan (None on a CPU)."""
    out = {"plan_gib": planned}
    settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    for label, on in (("expandable_segments", True), ("fixed_segments", False)):
        if device != "cuda":
            out[label] = None
            continue
        torch.cuda.empty_cache()  # what is allocated from here on takes segments of the new kind
        settings(f"expandable_segments:{on}")
        step = rl_step(model, tok, optimizer, scheduler, guard, prompts_for(a, a.batch, 5), a.group, a.alloc_tokens,
                       a.micro_batch)
        wave = validation_call(model, tok, prompts_for(a, -(-a.max_rows // a.val_k), 6), a.val_k, a.alloc_tokens,
                               a.max_rows, device)
        measured = {**step["peak_reserved_gib_by_phase"], "validation_wave": wave["peak_reserved_gib"]}
        out[label] = {"reserved_gib": measured, "within_plan": all(v <= planned[k] for k, v in measured.items())}
    if device == "cuda":  # back to the session's setting
        settings("expandable_segments:True")
    return out


def check_model(name: str, a, root: Path, device: str, quant: str, res: dict) -> dict:
    """Measure model `name` into `res` part by part, so what was measured survives a later failure."""
    t0 = time.perf_counter()
    folder = build_folder(name, root, device)
    mcfg = models.ModelConfig(name=str(folder), dtype="bfloat16" if device == "cuda" else "float32", quant=quant,
                           lora_r=16, lora_alpha=32, lora_targets="all-linear", gradient_checkpointing=True)
    model, tok = models.load_model(mcfg, torch.device(device))
    planned = {n: plan_gib(a, mcfg, n) for n in (a.new_tokens, a.alloc_tokens)}
    shutil.rmtree(folder, ignore_errors=True)
    res |= {"model": name, "quant": quant, "attn": model.config._attn_implementation,
            "seconds_build_and_load": round(time.perf_counter() - t0, 1)}
    print(f"[gpu_check] {name}: built and loaded in {res['seconds_build_and_load']}s ({quant}, {res['attn']})", file=sys.stderr)
    rows = a.batch * a.group
    wbytes = decode_bytes(model)
    n_layers, cfg = model.config.num_hidden_layers, model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * n_layers * cfg.num_key_value_heads * head_dim * 2  # K and V, bf16
    mean_ctx = 160 + a.new_tokens / 2
    bw = copy_bandwidth(device, a.copy_gib * GIB if device == "cuda" else 2**26)
    res["decode_bound"] = {
        "weight_bytes_per_step_gib": round(wbytes / GIB, 3), "copy_bandwidth_gb_s": round(bw / 1e9, 1),
        "kv_bytes_per_step_gib_at_mean_ctx": round(rows * mean_ctx * kv_per_token / GIB, 3),
        "bound_tokens_per_s_weights": round(rows * bw / wbytes, 1),
        "bound_tokens_per_s_weights_kv": round(rows * bw / (wbytes + rows * mean_ctx * kv_per_token), 1)}
    res["sampler"] = sampler_vs_generate(model, tok, make_prompts(a.gen_prompts, 1), a.group, a.gen_tokens,
                                         a.repeats if name != "qwen3-8b" else a.repeats_8b, device)
    if a.val_problems:  # before the step, as fst validates at step 0 (and a failing step cannot hide it)
        res["validation"] = validation_call(model, tok, prompts_for(a, a.val_problems, 4), a.val_k, a.new_tokens,
                                            a.max_rows, device)
        res["validation"]["plan_gib"] = planned[a.new_tokens]["validation_wave"]
        print(f"[gpu_check] {name}: validation {res['validation']['rows']} rows in {res['validation']['waves']} "
              f"waves, {res['validation']['seconds']}s, peak {res['validation']['peak_gib']} GiB", file=sys.stderr)
    optimizer, scheduler = fst.make_optimizer(model, fst.TrainConfig(lr=1e-5))
    guard = guards.UpdateGuard()  # its gradient-flow check runs on the warm-up step
    rl_step(model, tok, optimizer, scheduler, guard, make_prompts(2, 2), 2, 16, a.micro_batch)  # warm-up: kernels, Adam
    res["step"] = rl_step(model, tok, optimizer, scheduler, guard, prompts_for(a, a.batch, 3), a.group, a.new_tokens,
                          a.micro_batch)
    res["step"]["plan_gib_by_phase"] = {k: planned[a.new_tokens][k] for k in ("sampling", "base_kl", "training")}
    res["allocator"] = allocator_check(model, tok, a, optimizer, scheduler, guard, planned[a.alloc_tokens], device)
    res["step"]["fraction_of_decode_bound"] = round(
        res["step"]["tokens_per_s"] / res["decode_bound"]["bound_tokens_per_s_weights_kv"], 3)
    if res["step"]["peak_gib"] is not None:
        res["step"]["within_budget"] = res["step"]["peak_gib"] <= a.budget_gib
    print(f"[gpu_check] {name}: step {res['step']['seconds_step']}s, peak {res['step']['peak_gib']} GiB", file=sys.stderr)
    del model, optimizer, scheduler
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-1.5b", "qwen3-8b"],
                    choices=[m for m in SHAPES if m != "smoke"])
    ap.add_argument("--batch", type=int, default=8, help="B problems per step")
    ap.add_argument("--group", type=int, default=8, help="G rollouts per problem")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--gen-prompts", type=int, default=8, help="prompts in the sampler-vs-generate check (x G rows)")
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="alternating sampler/generate repeats (median)")
    ap.add_argument("--repeats-8b", type=int, default=1)
    ap.add_argument("--prompt-mode", choices=["random", "contexts"], default="random",
                    help="contexts: the step's and validation's prompts share one of --contexts prefixes")
    ap.add_argument("--contexts", type=int, default=4, help="shared contexts in --prompt-mode contexts")
    ap.add_argument("--context-tokens", type=int, default=160, help="tokens per shared context (100+)")
    ap.add_argument("--val-problems", type=int, default=0, help="a validation call of N problems (gsm8k.yaml: 200)")
    ap.add_argument("--val-k", type=int, default=4, help="samples per validation problem (gsm8k.yaml: 4)")
    ap.add_argument("--max-rows", type=int, default=256, help="rows per sampler wave (sampling.max_rows)")
    ap.add_argument("--alloc-tokens", type=int, default=128, help="new tokens of the allocator check's step and wave")
    ap.add_argument("--copy-gib", type=int, default=4)
    ap.add_argument("--budget-gib", type=float, default=22.0)
    ap.add_argument("--time-budget-s", type=float, default=450,
                    help="the 8B part runs only if the 1.5B part took under a third of this")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--cpu-smoke", action="store_true", help="toy shapes on CPU (fp32 compute): checks the code path")
    a = ap.parse_args()
    if a.cpu_smoke:
        device, models = "cpu", ["smoke"]
        a.batch, a.group, a.new_tokens, a.micro_batch, a.gen_prompts, a.gen_tokens, a.repeats = 2, 2, 8, 2, 2, 8, 1
        # 70 context tokens still pass rollout.MIN_SHARED_PREFIX; 3 x 2 validation rows in waves of 4
        a.context_tokens, a.max_rows, a.val_problems, a.val_k, a.alloc_tokens = 70, 4, min(a.val_problems, 3), 2, 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_check.py needs a CUDA GPU and none is visible here "
                             "(torch.cuda.is_available() is False).\nOn a CPU run bench/step_vs_trl.py and "
                             "bench/sampler_vs_generate.py, or this script's self-test: --cpu-smoke")
        device, models = "cuda", a.models
    quant = "4bit" if importlib.util.find_spec("bitsandbytes") else "none"  # the recipe's NF4 base
    start, failed = time.perf_counter(), False
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "settings": {k: v for k, v in vars(a).items() if k not in ("out", "models")}, "results": []}
    def stopped(signum, frame):  # `timeout` (bench/gpu_session.sh) sends SIGTERM: keep what was measured
        raise TimeoutError("stopped by SIGTERM (a timeout) before this model's check ended")
    signal.signal(signal.SIGTERM, stopped)
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and shutil.disk_usage(shm).free > 20 * GIB  # the 8B bf16 folder is ~16 GB
    root = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=shm if in_ram else None))
    try:
        for name in models:
            if name == "qwen3-8b" and quant != "4bit":
                summary["results"].append({"model": name, "skipped": "bitsandbytes not installed (4-bit needed)"})
                continue
            spent = time.perf_counter() - start
            if name == "qwen3-8b" and spent > a.time_budget_s / 3:  # the 8B part costs ~2-3x the 1.5B one
                summary["results"].append({"model": name, "skipped": f"{spent:.0f}s spent of {a.time_budget_s}s"})
                continue
            res = {"model": name}
            summary["results"].append(res)
            try:
                check_model(name, a, root, device, quant, res)
            except Exception as e:  # report what was measured so far, then fail
                res["error"] = f"{type(e).__name__}: {e}"
                failed = True
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary["seconds_total"] = round(time.perf_counter() - start, 1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    if failed:
        raise SystemExit("[gpu_check] a model check failed: see its \"error\" above")


if __name__ == "__main__":
    main()
