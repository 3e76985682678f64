"""The memory plan (`fst.py --plan`): each phase's peak GPU memory from the config and the model's shapes.

The config is read duck-typed (plumbing imports no method file). Weights, LoRA state and KV caches are exact
(tests/test_plan.py checks them against real tensors); activations and logits are estimates from the shapes.
A phase's peak = the resident weights + its own transient; phases never overlap.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from plumbing import config


GIB = 2 ** 30
CHARS_PER_TOKEN = 4           # English text in a BPE vocabulary: ~4 characters a token
SEED_PROMPT_TOKENS = 250      # chat template + the task's seed prompt + one problem (GSM8K's longest: ~200)
DEMO_QUESTION_TOKENS = 200    # a worked example's question; its solution is an RL completion (max_new_tokens)
REFLECTION_EXTRA_TOKENS = 400  # the reflection template and the grader's feedback around the examples
CUDA_CONTEXT_BYTES = GIB      # CUDA context, cuBLAS workspaces: taken from the card before any tensor
ALLOCATOR_SLACK = 0.10        # shapes change every step: keep a tenth of the rest free for fragmentation
# Logits transients, in fp32 copies beside the head's output (compute dtype) of each element:
DECODE_FP32_COPIES = 3        # decode [rows, V]: float, log-softmax, the sampling probabilities
CHUNK_FP32_COPIES = 4         # a training chunk [rows, chunk, V]: float, exp, softmax, their gradient
BASE_FP32_COPIES = 2          # a no-grad chunk: float, exp
KV_GROW_BLOCK = 128           # rollout._GrowingLayer.block: the spare positions a sampler's cache grows by
FP32_HEAD_BLOCK = 16384       # Float32Head's block: vocabulary rows upcast to float32 at a time


class PlanError(ValueError):
    """The plan cannot be made (an unknown model's shapes); the message is one line."""


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a dense decoder-only transformer (Llama / Qwen family)."""
    layers: int
    hidden: int
    heads: int                # query heads
    kv_heads: int
    head_dim: int
    intermediate: int         # MLP width (gate / up / down projections)
    vocab: int
    tied: bool                # the output head is the input embedding
    qkv_bias: bool = False    # Qwen2: biases on the q, k and v projections
    qk_norm: bool = False     # Qwen3: an RMSNorm over each head's q and k

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, {self.heads} q / {self.kv_heads} KV heads x "
                f"{self.head_dim}, MLP {self.intermediate}, vocab {self.vocab:,}, "
                f"{'tied' if self.tied else 'untied'} head")


# The configs' own models, so that --plan needs no network (values from each model's config.json).
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(28, 1536, 12, 2, 128, 8960, 151936, tied=True, qkv_bias=True),
    "Qwen/Qwen3-8B": ModelShape(36, 4096, 32, 8, 128, 12288, 151936, tied=False, qk_norm=True),
    "smollm2-135m": ModelShape(30, 576, 9, 3, 64, 1536, 49152, tied=True),
}


def _shape_from_config(c) -> ModelShape:
    """A transformers config -> ModelShape; PlanError for what the arithmetic does not model."""
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    if any(getattr(c, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise PlanError(f"model type {c.model_type!r} is a mixture of experts: the plan knows dense decoders only")
    heads = c.num_attention_heads
    return ModelShape(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                      kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                      head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                      intermediate=c.intermediate_size, vocab=c.vocab_size,
                      tied=bool(getattr(c, "tie_word_embeddings", False)),
                      qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
                      qk_norm=c.model_type.startswith("qwen3"))


@functools.lru_cache(maxsize=None)
def model_shape(name: str) -> ModelShape:
    """The shapes of model `name`, never from the network: a local folder's config.json, a .gguf file's
    metadata, the built-in table (KNOWN_SHAPES), or the Hugging Face cache of an earlier download."""
    from transformers import AutoConfig
    if (Path(name) / "config.json").is_file():
        return _shape_from_config(AutoConfig.from_pretrained(name))
    if name.endswith(".gguf") and Path(name).is_file():
        return _shape_from_config(AutoConfig.from_pretrained(Path(name).parent, gguf_file=Path(name).name))
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    try:
        return _shape_from_config(AutoConfig.from_pretrained(name, local_files_only=True))
    except (OSError, ValueError):  # not cached; or no valid hub id (huggingface_hub's ValueError)
        raise PlanError(f"no shapes known for model {name!r}: give a local folder with its config.json, or "
                        f"download it once (known without one: {', '.join(KNOWN_SHAPES)})") from None


def layer_linears(s: ModelShape) -> dict[str, tuple[int, int]]:
    """One decoder layer's linear layers: name -> (in features, out features)."""
    q, kv, h, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}


def _quantised_bytes(n_in: int, n_out: int, quant: str) -> int:
    """Bytes of one bitsandbytes linear weight. NF4, double-quantised: 4 bits a weight, an 8-bit absmax per 64,
    an fp32 absmax per 256 of those, the code tables and an offset. 8-bit: a byte a weight, an fp32 scale a row."""
    n = n_in * n_out
    if quant == "8bit":
        return n + 4 * n_out
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4


def weight_bytes(s: ModelShape, quant: str, dtype_bytes: int) -> int:
    """The base model's resident bytes: the decoder layers' linear weights quantised (quant 4bit / 8bit)
    or in the compute dtype, norms and biases, the embedding and (untied) the head in the compute dtype."""
    linears = layer_linears(s).values()
    body = sum(_quantised_bytes(i, o, quant) if quant != "none" else i * o * dtype_bytes for i, o in linears)
    small = 2 * s.hidden                                                  # the two RMSNorms of a layer
    small += (s.heads + 2 * s.kv_heads) * s.head_dim if s.qkv_bias else 0
    small += 2 * s.head_dim if s.qk_norm else 0
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    return s.layers * (body + small * dtype_bytes) + (s.hidden + embeddings) * dtype_bytes


def lora_params(s: ModelShape, r: int, targets: str) -> int:
    """LoRA parameters (A and B: r x (in + out) per adapted linear). targets as peft reads a string:
    all-linear = every linear but the head; otherwise a regex matched in full against module names."""
    total = 0
    for layer in range(s.layers):
        for name, (n_in, n_out) in layer_linears(s).items():
            if targets == "all-linear" or re.fullmatch(targets, f"model.layers.{layer}.{name}"):
                total += r * (n_in + n_out)
    return total


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int) -> int:
    """One token's KV cache over every layer: K and V, kv_heads x head_dim each."""
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes


def lora_input_features(s: ModelShape, targets: str) -> int:
    """The input features of one decoder layer's LoRA-adapted linears: peft casts each one's input to the
    LoRA's float32 (a copy per adapted linear when the compute dtype is not float32) and backward keeps it."""
    return sum(n_in for name, (n_in, _) in layer_linears(s).items()
               if targets == "all-linear" or re.fullmatch(targets, f"model.layers.0.{name}"))


def eager_scores_bytes(s: ModelShape, dtype_bytes: int, queries: int, keys: int, grad: bool) -> int:
    """model.attn=eager, one layer of one row: the [heads, queries, keys] scores in the compute dtype, their
    float32 softmax and its cast back (what backward keeps: the probabilities), where SDPA materialises none."""
    return s.heads * queries * keys * (2 * dtype_bytes + 4 + (dtype_bytes if grad else 0))


def fp32_head_bytes(s: ModelShape, positions: int) -> int:
    """model.fp32_head, one head call on `positions` hidden states: a vocabulary block upcast to float32 (the
    forward without a bf16-in float32-out matmul, and the backward) and the hidden states' float32 copy."""
    return FP32_HEAD_BLOCK * s.hidden * 4 + positions * s.hidden * 4


def _layer_bytes_per_token(s: ModelShape, dtype_bytes: int, grad: bool) -> int:
    """An estimate of one decoder layer's activations per token: without grad the residual, norm, attention
    and MLP outputs; with grad what backward keeps and the widest point's gradient buffers. Both add K and
    V repeated over the query heads (SDPA does that whenever a padding mask is given)."""
    h, i, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_heads * s.head_dim
    gqa = 2 * q if s.heads > s.kv_heads else 0
    width = 8 * h + 3 * q + 2 * kv + 6 * i if grad else 4 * h + 3 * i
    return (width + gqa) * dtype_bytes


@dataclass(frozen=True)
class PhasePlan:
    """One phase of the plan: the bytes it needs and the config key that sizes it."""
    name: str
    key: str                  # the config key to change when it does not fit
    bytes: int                # resident ones: their size; the others: their own peak on top of the resident
    rows: int = 0
    tokens: int = 0           # per row: prompt + new tokens (training: the padded sequence)
    detail: str = ""
    resident: bool = False    # held for the whole run (weights, LoRA and its optimiser state)


@dataclass(frozen=True)
class PromptLengths:
    """The prompt lengths (tokens) the plan assumes; printed with it."""
    problem: int              # the chat template, the seed prompt and one problem
    context: int              # an evolved context's tokens beyond that (instruction and demos; rl mode: 0)
    reflection: int           # one reflection prompt

    def describe(self) -> str:
        said = f"prompts (assumed, ~{CHARS_PER_TOKEN} chars a token): a problem with the seed prompt {self.problem} tokens"
        if not self.reflection:
            return said + " (rl mode: no evolved context)"
        return (f"{said}; an evolved context adds {self.context} (fast.max_prompt_chars, and fast.max_demos x "
                f"(question + max_new_tokens) with a demo operator); a reflection prompt {self.reflection}")


def prompt_lengths(cfg) -> PromptLengths:
    """The longest prompts the config lets a run build (rl mode never evolves its context)."""
    f, new = cfg.fast, cfg.sampling.max_new_tokens
    demos = f.max_demos * (DEMO_QUESTION_TOKENS + new) if any(op.startswith("demo") for op in f.operators) else 0
    context = f.max_prompt_chars // CHARS_PER_TOKEN + demos
    examples = f.minibatch * (DEMO_QUESTION_TOKENS + new)  # the parent's rollouts shown to the reflector
    if cfg.mode == "rl":
        return PromptLengths(problem=SEED_PROMPT_TOKENS, context=0, reflection=0)
    return PromptLengths(problem=SEED_PROMPT_TOKENS, context=context,
                         reflection=context + examples + REFLECTION_EXTRA_TOKENS)


def _sampler_phase(name: str, s: ModelShape, b: int, *, rows: int, contexts: int, distinct: int,
                   context_tokens: int, problem_tokens: int, new_tokens: int, eager: bool = False,
                   fp32_head: bool = False) -> PhasePlan:
    """One sampler wave of `rows` rows: the prefill (each shared context once, then each of `distinct`
    prompts' own tokens; its cache rows then repeated for their samples) or the decode (the whole cache
    at prompt + new tokens and the spare block it grows by, the old copy of the one layer growing, SDPA's
    repeated K/V of one layer, the [rows, V] logits; eager's scores, the fp32 head's copies), the larger."""
    kv, prompt = kv_bytes_per_token(s, b), context_tokens + problem_tokens
    prefilled = contexts * context_tokens + distinct * problem_tokens
    prefill = prefilled * kv + max(prefilled * _layer_bytes_per_token(s, b, grad=False), rows * prompt * kv)
    prefill += max(contexts, distinct) * eager_scores_bytes(s, b, prompt, prompt, False) if eager else 0
    cache = rows * (prompt + new_tokens + KV_GROW_BLOCK) * kv
    gqa = 2 * s.heads * s.head_dim * b if s.heads > s.kv_heads else 0
    decode = (cache + rows * (prompt + new_tokens) * (kv // s.layers + gqa)
              + rows * s.vocab * (b + 4 * DECODE_FP32_COPIES))
    decode += rows * eager_scores_bytes(s, b, 1, prompt + new_tokens, False) if eager else 0
    decode += fp32_head_bytes(s, rows) if fp32_head else 0
    return PhasePlan(name, "sampling.max_rows", max(prefill, decode), rows, prompt + new_tokens,
                     f"KV {cache / GIB:.2f} GiB, prefill {prefill / GIB:.2f}, decode {decode / GIB:.2f}")


def _training_phases(cfg, s: ModelShape, b: int, prompt: int) -> list[PhasePlan]:
    """A training micro-batch (forward and backward; under gradient checkpointing each layer keeps its
    input and one layer is recomputed at a time) and the no-grad base pass, each with its logits chunk
    (train.logprob_chunk positions x V, checkpointed one at a time)."""
    t, m, new = cfg.train, cfg.model, cfg.sampling.max_new_tokens
    rows, tokens, chunk = t.micro_batch, prompt + new, min(t.logprob_chunk, new)
    eager, fp32_head = m.attn == "eager", m.fp32_head and b < 4
    lora_fp32 = 4 * lora_input_features(s, m.lora_targets) if b < 4 else 0  # peft's float32 input copies
    one_layer = rows * tokens * (_layer_bytes_per_token(s, b, grad=True) + lora_fp32)
    one_layer += rows * eager_scores_bytes(s, b, tokens, tokens, True) if eager else 0
    kept = (rows * tokens * s.hidden * b * s.layers + one_layer if m.gradient_checkpointing
            else one_layer * s.layers)
    hidden = 2 * rows * new * s.hidden * b                   # the completion's last hidden states and their grad
    head = fp32_head_bytes(s, rows * chunk) if fp32_head else 0
    logits = rows * chunk * s.vocab * (b + 4 * CHUNK_FP32_COPIES) + head
    train = PhasePlan(f"training micro-batch (checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'})",
                      "train.micro_batch", kept + hidden + logits, rows, tokens,
                      f"activations {kept / GIB:.2f} GiB, logits chunk {logits / GIB:.2f} (train.logprob_chunk)")
    # The base pass prefills each prompt once into a cache, then runs the completions on top of it.
    base_kv = rows * tokens * kv_bytes_per_token(s, b)
    base_logits = rows * chunk * s.vocab * (b + 4 * BASE_FP32_COPIES) + head
    base = base_kv + rows * tokens * _layer_bytes_per_token(s, b, grad=False) + hidden // 2 + base_logits
    base += rows * eager_scores_bytes(s, b, tokens, tokens, False) if eager else 0
    return [train, PhasePlan("base pass (no grad, KL)", "train.micro_batch", base, rows, tokens,
                             f"KV {base_kv / GIB:.2f} GiB, logits chunk {base_logits / GIB:.2f}")]


def _sampling_phases(cfg, s: ModelShape, reflector: ModelShape | None, b: int, p: PromptLengths) -> list[PhasePlan]:
    """Every sampler call of a step, each capped at sampling.max_rows rows a wave: the RL step's B*G
    rollouts, the fast round's scoring and reflection, validation's eval.n x eval.k."""
    smp, t, f, e = cfg.sampling, cfg.train, cfg.fast, cfg.eval
    cap, new, fst = smp.max_rows, smp.max_new_tokens, cfg.mode != "rl"
    common = dict(context_tokens=p.context, problem_tokens=p.problem, new_tokens=new, eager=cfg.model.attn == "eager",
                  fp32_head=cfg.model.fp32_head and b < 4)
    rl_rows, contexts = t.batch_size * smp.group_size, min(f.pool_size, smp.group_size) if fst else 1
    phases = [_sampler_phase(f"RL step sampling (B x G = {rl_rows})", s, b, rows=min(rl_rows, cap),
                             contexts=contexts, distinct=min(t.batch_size * contexts, rl_rows, cap), **common)]
    if fst:
        contexts, anchors = max(f.pool_size, f.wave), f.every * t.batch_size
        rows = min(contexts * anchors, cap)
        phases.append(_sampler_phase(f"fast-round scoring ({contexts} contexts x {anchors} anchors)", s, b,
                                     rows=rows, contexts=contexts, distinct=rows, **common))
        rows = min(f.wave, cap)
        if reflector is not None:  # an endpoint reflects on its own machine
            phases.append(_sampler_phase(f"reflection (fast.wave = {f.wave})", reflector, b, rows=rows,
                                         contexts=rows, distinct=0, context_tokens=p.reflection, problem_tokens=0,
                                         new_tokens=f.reflector_max_new_tokens, eager=common["eager"],
                                         fp32_head=common["fp32_head"] and reflector is s))
    rows = min(e.n * e.k, cap)
    phases.append(_sampler_phase(f"validation (eval.n x eval.k = {e.n * e.k})", s, b, rows=rows, contexts=1,
                                 distinct=-(-rows // e.k), **common))
    return phases


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of one config on one card: resident bytes, every phase's own bytes, the verdict."""
    model: str
    shape: ModelShape
    prompts: PromptLengths
    kv_per_token: int
    phases: list[PhasePlan]   # the resident ones first
    card_bytes: int

    @property
    def usable(self) -> int:
        return int((self.card_bytes - CUDA_CONTEXT_BYTES) * (1 - ALLOCATOR_SLACK))

    @property
    def resident(self) -> int:
        return sum(p.bytes for p in self.phases if p.resident)

    def peak(self, phase: PhasePlan) -> int:
        return self.resident if phase.resident else self.resident + phase.bytes

    def too_big(self) -> list[PhasePlan]:
        return [p for p in self.phases if self.peak(p) > self.usable]

    @property
    def fits(self) -> bool:
        return not self.too_big()


def memory_plan(cfg, card_bytes: int, at_start: bool = False) -> MemoryPlan:
    """The plan of config `cfg` (fst.Config, read duck-typed) on a card of `card_bytes`: with the longest
    contexts the config lets the fast loop build, or (at_start) with the seed prompt the run starts from."""
    m = cfg.model
    shape, b = model_shape(m.name), getattr(torch, m.dtype).itemsize
    quant = {"4bit": "NF4", "8bit": "int8", "none": m.dtype}[m.quant]
    lora = lora_params(shape, m.lora_r, m.lora_targets)
    head = "tied embedding" if shape.tied else "embedding + head"
    resident = [PhasePlan(f"weights ({quant} body, {m.dtype} {head})", "model.quant",
                          weight_bytes(shape, m.quant, b), resident=True),
                # fp32 LoRA weights (load_model), their gradients, AdamW's two moments: 16 bytes a parameter
                PhasePlan(f"LoRA r={m.lora_r} ({lora / 1e6:.1f} M): fp32 + grads + AdamW", "model.lora_r",
                          16 * lora, resident=True)]
    reflector = shape
    if cfg.fast.on_endpoint():  # reflection runs on the endpoint's machine
        reflector = None
    elif cfg.mode != "rl" and cfg.fast.reflector not in ("base", "policy"):
        reflector = model_shape(cfg.fast.reflector)
        resident.append(PhasePlan(f"reflector weights ({cfg.fast.reflector})", "fast.reflector",
                                  weight_bytes(reflector, m.quant, b), resident=True))
    p = prompt_lengths(cfg)
    if at_start:
        p = dataclasses.replace(p, context=0, reflection=max(0, p.reflection - p.context))
    phases = _sampling_phases(cfg, shape, reflector, b, p)
    if cfg.mode != "gepa":  # gepa trains nothing
        phases[1:1] = _training_phases(cfg, shape, b, p.problem + p.context)
    return MemoryPlan(m.name, shape, p, kv_bytes_per_token(shape, b), resident + phases, card_bytes)


def largest_fitting(cfg, key: str, card_bytes: int) -> int | None:
    """The largest value of integer `key` ("section.field"), at most its current one, at which every phase
    it sizes fits the card (None: not even 1)."""
    section, name = key.split(".")

    def fits(value):
        changed = copy.deepcopy(cfg)
        setattr(getattr(changed, section), name, value)
        return not [p for p in memory_plan(changed, card_bytes).too_big() if p.key == key]
    low, high = 0, getattr(getattr(cfg, section), name)
    while low < high:  # invariant: low fits (or is 0), every value above high does not
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low or None


def plan_advice(cfg, plan: MemoryPlan) -> list[str]:
    """What to change so that the plan fits: a value of each key whose phases do not."""
    if plan.resident > plan.usable:
        return [f"the resident weights alone need {plan.resident / GIB:.1f} GiB: a larger card, model.quant=4bit "
                "or a smaller model"]
    advice = []
    for key in dict.fromkeys(p.key for p in plan.too_big()):
        value = largest_fitting(cfg, key, plan.card_bytes) if key in ("sampling.max_rows", "train.micro_batch") else None
        advice.append(f"set {key}={value}" if value else f"lower {key} (even its smallest value does not fit)")
    return advice


def format_plan(plan: MemoryPlan, title: str, card: str, advice: list[str]) -> str:
    """The plan as the table --plan prints; its last line says whether it fits."""
    lines = [f"memory plan: {title}", f"  model: {plan.model}: {plan.shape.describe()}; "
             f"KV cache {plan.kv_per_token:,} bytes a token", f"  {plan.prompts.describe()}",
             f"  card: {card}; usable {plan.usable / GIB:.1f} GiB (minus {CUDA_CONTEXT_BYTES / GIB:.0f} GiB CUDA "
             f"context, then {ALLOCATOR_SLACK:.0%} allocator slack)",
             f"  {'phase':<48}{'rows':>6}{'tokens':>8}{'own GiB':>9}{'peak GiB':>10}  key / detail"]
    for p in plan.phases:
        rows = f"{p.rows:>6}{p.tokens:>8}" if p.rows else " " * 14
        flag = "  <- too big" if plan.peak(p) > plan.usable else ""
        lines.append(f"  {p.name:<48}{rows}{p.bytes / GIB:>9.2f}{plan.peak(p) / GIB:>10.2f}  {p.key}"
                     f"{': ' + p.detail if p.detail else ''}{flag}")
    worst = max(plan.phases, key=plan.peak)
    if plan.fits:
        lines.append(f"fits: the largest peak is {plan.peak(worst) / GIB:.1f} GiB ({worst.name}) of "
                     f"{plan.usable / GIB:.1f} GiB usable")
    else:
        lines.append(f"does not fit: {worst.name} needs {plan.peak(worst) / GIB:.1f} GiB of {plan.usable / GIB:.1f} "
                     f"GiB usable; {'; '.join(advice)}")
    return "\n".join(lines)


def _card(gpu_gib: float | None, device: str) -> tuple[int, str]:
    """(bytes, description) of the card the plan is for: --gpu-gib, the GPU the run would use, or 24 GiB."""
    if gpu_gib:
        return int(gpu_gib * GIB), f"{gpu_gib:g} GiB (--gpu-gib)"
    if device == "cpu":
        return 24 * GIB, "the config runs on the CPU (device: cpu): assumed a 24 GiB card (--gpu-gib N for another)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name}, {props.total_memory / GIB:.1f} GiB (torch.cuda)"
    return 24 * GIB, "no CUDA GPU here: assumed 24 GiB (--gpu-gib N for another card)"


def print_memory_plan(args, load_config) -> None:
    """fst.py --plan [--gpu-gib N]: print the memory plan of --config (or --resume's run) and exit."""
    config_file = args.config or str(Path(args.resume) / "config.yaml")
    try:
        cfg = load_config(config_file, args.set)
        card_bytes, card = _card(args.gpu_gib, cfg.device)
        plan = memory_plan(cfg, card_bytes)
    except (config.ConfigError, PlanError) as e:
        raise SystemExit(f"--plan: {e}")
    print(format_plan(plan, f"{config_file} (mode {cfg.mode})", card, plan_advice(cfg, plan)))


def plan_refusal(cfg, card_bytes: int) -> str | None:
    """The one line a run on a card of `card_bytes` stops with when its plan does not fit even with the seed
    prompt (None: it fits, or the shapes are unknown). Fitting at the start but not with the longest contexts
    the config allows (an upper bound) is a warning: the out-of-memory handler would save the step."""
    try:
        plan, start = memory_plan(cfg, card_bytes), memory_plan(cfg, card_bytes, at_start=True)
    except PlanError as e:
        print(f"[fst] memory plan skipped: {e}", file=sys.stderr)
        return None
    if plan.fits:
        return None
    if start.fits:
        worst = max(plan.too_big(), key=plan.peak)
        print(f"[fst] memory plan: fits with the seed prompt, but {worst.name} would need {plan.peak(worst) / GIB:.1f} "
              f"GiB of {plan.usable / GIB:.1f} usable with the longest contexts the config allows; "
              f"{'; '.join(plan_advice(cfg, plan))}", file=sys.stderr)
        return None
    plan = start
    worst = max(plan.too_big(), key=plan.peak)
    return (f"memory plan: {worst.name} needs {plan.peak(worst) / GIB:.1f} GiB of this card's "
            f"{plan.usable / GIB:.1f} GiB usable; {'; '.join(plan_advice(cfg, plan))} (fst.py --plan shows the plan)")
