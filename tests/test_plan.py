"""The memory plan (plumbing/plan.py, `fst.py --plan`): its exact parts (weights, LoRA state,
KV cache) against the bytes of real tensors on the tiny model; the verdicts on the configs' own models
with no network and no GPU; a CUDA card too small for the plan stopping the run at start-up."""
import argparse
import socket
import types

import pytest
import torch

import fst
from plumbing import config, dist, models, plan as memory, startup

GIB = 2 ** 30


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_bytes_per_token_equal_a_real_cache(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype))
    rows, tokens = 3, 7
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    real = tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
    shape = memory.model_shape(tiny_model_dir)
    assert real == rows * tokens * memory.kv_bytes_per_token(shape, getattr(torch, dtype).itemsize)


@pytest.mark.parametrize("dtype,targets", [("float32", "all-linear"), ("bfloat16", r".*\.(q_proj|v_proj|down_proj)")])
def test_weight_and_lora_bytes_equal_the_real_parameters_after_an_optimizer_step(tiny_model_dir, dtype, targets):
    r = 4
    mc = models.ModelConfig(name=tiny_model_dir, dtype=dtype, quant="none", lora_r=r, lora_targets=targets)
    model, _ = models.load_model(mc, torch.device("cpu"))
    shape = memory.model_shape(tiny_model_dir)
    base = [p for p in model.parameters() if not p.requires_grad]
    assert tensor_bytes(base) == memory.weight_bytes(shape, "none", getattr(torch, dtype).itemsize)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in lora) == memory.lora_params(shape, r, targets) > 0
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    ids = torch.randint(0, shape.vocab, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    # AdamW's moments (its 1-element step counters aside) beside the weights and their gradients
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    real = tensor_bytes(lora) + tensor_bytes(p.grad for p in lora) + tensor_bytes(moments)
    plan = memory.memory_plan(plan_config(tiny_model_dir, dtype=dtype, lora_r=r, lora_targets=targets), 24 * GIB)
    assert real == plan.phases[1].bytes and plan.phases[1].key == "model.lora_r"
    assert plan.phases[0].bytes == tensor_bytes(base)


def test_nf4_weight_bytes_equal_bitsandbytes_storage(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    mc = models.ModelConfig(name=tiny_model_dir, dtype="bfloat16", quant="4bit")
    model, _ = models.load_model(mc, torch.device("cpu"))
    real = 0
    for p in model.parameters():
        if not p.requires_grad:
            real += p.numel() * p.element_size()  # a Params4bit: its packed 4-bit bytes
            qs = getattr(p, "quant_state", None)
            if qs is not None:  # double quantisation: 8-bit absmax, its fp32 absmax and both code tables
                real += tensor_bytes([qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code])
    assert real == memory.weight_bytes(memory.model_shape(tiny_model_dir), "4bit", 2)


def plan_config(name, **model_keys):
    return fst.load_config(None, [f"model.name={name}"] + [f"model.{k}={v}" for k, v in model_keys.items()])


@pytest.fixture()
def offline_cpu(monkeypatch):
    """No network (any connection raises) and no GPU."""
    def refuse(*args, **kwargs):
        raise OSError("the plan must not use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def plan_output(capsys, *args) -> str:
    fst.main(["--plan", *args])
    return capsys.readouterr().out


def test_gsm8k_fits_24_gib_in_both_modes(offline_cpu, capsys):
    for mode in ("rl", "fst"):
        out = plan_output(capsys, "--config", "configs/gsm8k.yaml", "--gpu-gib", "24", "--set", f"mode={mode}")
        assert "28,672 bytes a token" in out  # ../shared/docs/gpu-readiness.md's arithmetic
        assert out.splitlines()[-1].startswith("fits:"), out
        assert "validation" in out and "256" in out  # validation batched: sampling.max_rows rows a wave


def test_qwen3_8b_does_not_fit_24_gib_names_the_key_and_fits_80(offline_cpu, capsys):
    for mode in ("rl", "fst"):
        small = plan_output(capsys, "--config", "gsm8k-qwen3-8b.yaml", "--gpu-gib", "24", "--set", f"mode={mode}")
        assert small.splitlines()[-1].startswith("does not fit:") and "set sampling.max_rows=" in small
        big = plan_output(capsys, "--config", "gsm8k-qwen3-8b.yaml", "--gpu-gib", "80", "--set", f"mode={mode}")
        assert "147,456 bytes a token" in big and big.splitlines()[-1].startswith("fits:"), big


def test_the_advised_value_fits_and_one_more_does_not(offline_cpu):
    cfg = fst.load_config("configs/gsm8k-qwen3-8b.yaml", ["mode=fst"])
    plan = memory.memory_plan(cfg, 24 * GIB)
    advice = memory.plan_advice(cfg, plan)
    value = int(advice[0].split("sampling.max_rows=")[1])
    cfg.sampling.max_rows = value
    assert memory.memory_plan(cfg, 24 * GIB).fits
    cfg.sampling.max_rows = value + 1
    assert not memory.memory_plan(cfg, 24 * GIB).fits


def test_training_that_does_not_fit_names_micro_batch(offline_cpu):
    cfg = fst.load_config("configs/gsm8k.yaml", ["model.gradient_checkpointing=false", "train.micro_batch=64"])
    advice = memory.plan_advice(cfg, memory.memory_plan(cfg, 24 * GIB))
    assert any(a.startswith("set train.micro_batch=") for a in advice), advice


def test_without_a_gpu_the_plan_assumes_24_gib(offline_cpu, capsys):
    out = plan_output(capsys, "--config", "configs/gsm8k.yaml")
    assert "no CUDA GPU here: assumed 24 GiB" in out and out.splitlines()[-1].startswith("fits:")


def test_an_unknown_model_is_one_line(offline_cpu, capsys):
    with pytest.raises(SystemExit) as e:
        plan_output(capsys, "--config", "configs/gsm8k.yaml", "--set", "model.name=nobody/no-such-model")
    assert "no shapes known for model 'nobody/no-such-model'" in str(e.value) and "\n" not in str(e.value)


def test_a_card_too_small_for_the_plan_stops_at_start_up(monkeypatch, tmp_path):
    cfg = fst.load_config("configs/gsm8k.yaml")
    assert memory.plan_refusal(cfg, 24 * GIB) is None
    line = memory.plan_refusal(cfg, 8 * GIB)
    assert line.startswith("memory plan: validation") and "set sampling.max_rows=" in line and "\n" not in line
    # The same through start_up, on a simulated 8 GiB CUDA card.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=8 * GIB, name="small card"))
    args = argparse.Namespace(trust_old_checkpoint=False, resume=None, config="configs/gsm8k.yaml",
                              set=[f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        startup.start_up(args, dist.Dist(), fst.load_config, fst.make_task)
    assert str(e.value) == line
    assert not list(tmp_path.iterdir())  # stopped before a run folder exists


def test_an_endpoint_reflector_reflects_off_this_card():
    cfg = fst.load_config("configs/gsm8k.yaml", ["mode=fst", "fast.reflector=openai:some-model"])
    plan = memory.memory_plan(cfg, 24 * GIB)
    assert plan.fits and not any(p.name.startswith(("reflection", "reflector")) for p in plan.phases)
    local = memory.memory_plan(fst.load_config("configs/gsm8k.yaml", ["mode=fst"]), 24 * GIB)
    assert any(p.name.startswith("reflection") for p in local.phases)


def test_a_plan_that_fits_only_with_the_seed_prompt_warns_and_runs(capsys):
    """tiny.yaml's bound (contexts as long as fast.max_prompt_chars and max_demos allow, no checkpointing)
    is over 24 GiB, its start is not: the run starts, with one warning line naming the key."""
    cfg = fst.load_config("configs/tiny.yaml", ["mode=fst"])
    assert not memory.memory_plan(cfg, 24 * GIB).fits and memory.memory_plan(cfg, 24 * GIB, at_start=True).fits
    assert memory.plan_refusal(cfg, 24 * GIB) is None
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("[fst] memory plan: fits with the seed prompt") and "train.micro_batch" in warning
    assert "\n" not in warning
    assert memory.plan_refusal(cfg, 2 * GIB) is not None  # a card too small even for the start


@pytest.mark.parametrize("name,published", [("Qwen/Qwen2.5-1.5B-Instruct", 1.54e9), ("Qwen/Qwen3-8B", 8.19e9),
                                            ("smollm2-135m", 134.5e6)])
def test_the_built_in_shapes_count_the_real_architectures_parameters(name, published):
    """The table's shapes, built as the real architecture on the meta device (no memory): the plan's
    arithmetic counts every parameter (Qwen2's q/k/v biases, Qwen3's q/k norms, an untied head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    s = memory.KNOWN_SHAPES[name]
    kind = Qwen3Config if s.qk_norm else Qwen2Config if s.qkv_bias else LlamaConfig
    config = kind(num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                  num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate,
                  vocab_size=s.vocab, tie_word_embeddings=s.tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert memory.weight_bytes(s, "none", 1) == sum(p.numel() for p in model.parameters())
    assert abs(memory.weight_bytes(s, "none", 1) / published - 1) < 0.005


def test_the_built_in_smollm2_shape_is_the_dequantised_checkpoints(tokenizer):
    # the tokenizer fixture has dequantised the alias's GGUF into a folder with its config.json
    assert memory.model_shape(models.resolve_model_path("smollm2-135m")) == memory.KNOWN_SHAPES["smollm2-135m"]


def test_plan_of_a_resumed_run_reads_its_config(offline_cpu, capsys, tmp_path):
    (tmp_path / "config.yaml").write_text((config.ROOT / "configs" / "gsm8k.yaml").read_text())
    out = plan_output(capsys, "--resume", str(tmp_path), "--set", "sampling.max_rows=100")
    assert f"{tmp_path / 'config.yaml'} (mode rl)" in out and "   100  " in out


def test_the_sampler_cache_with_its_spare_block_is_within_the_plan(tiny_model_dir):
    """rollout's growing cache after a prefill of P tokens and N decode steps holds at most P + N + one
    spare block a layer: what the plan counts (and more than the tokens alone)."""
    import rollout
    from transformers import AutoConfig
    assert memory.KV_GROW_BLOCK == rollout._GrowingLayer.block
    assert memory.FP32_HEAD_BLOCK == models.Float32Head(torch.nn.Linear(2, 3)).block
    shape, rows, P, N = memory.model_shape(tiny_model_dir), 3, 37, 100
    cache = rollout._new_cache(types.SimpleNamespace(config=AutoConfig.from_pretrained(tiny_model_dir)))
    kv = lambda n: torch.randn(rows, shape.kv_heads, n, shape.head_dim)
    for i, layer in enumerate(cache.layers):
        layer.update(kv(P), kv(P))
        for _ in range(N):
            layer.update(kv(1), kv(1))
    real = tensor_bytes([t for layer in cache.layers for t in (layer.kbuf, layer.vbuf)])
    per_token = memory.kv_bytes_per_token(shape, 4)
    assert rows * (P + N) * per_token < real <= rows * (P + N + memory.KV_GROW_BLOCK) * per_token


def test_peft_float32_input_copies_are_what_the_plan_adds_per_adapted_linear(tiny_model_dir):
    """A bf16 base with float32 LoRA: backward keeps a float32 copy of each adapted linear's input. Adding
    down_proj to the targets adds tokens x its input features x 4 bytes a layer, as the plan says."""
    def saved_fp32_bytes(targets):
        mc = models.ModelConfig(name=tiny_model_dir, dtype="bfloat16", lora_r=4, lora_targets=targets)
        model, _ = models.load_model(mc, torch.device("cpu"))
        params, seen = {p.data_ptr() for p in model.parameters()}, {}

        def pack(t):  # float32 activations; not the LoRA weights nor their r-wide products
            if t.dtype == torch.float32 and t.data_ptr() not in params and t.shape[-1] != mc.lora_r:
                seen[t.data_ptr()] = t.numel() * 4
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 100, (2, 9))).logits.float().sum()
        return sum(seen.values())
    shape = memory.model_shape(tiny_model_dir)
    narrow, wide = r".*\.q_proj", r".*\.(q_proj|down_proj)"
    added = memory.lora_input_features(shape, wide) - memory.lora_input_features(shape, narrow)
    assert added == shape.intermediate
    assert saved_fp32_bytes(wide) - saved_fp32_bytes(narrow) == 2 * 9 * added * 4 * shape.layers


def test_eager_attention_the_fp32_head_and_the_lora_copies_raise_the_phases_they_touch(offline_cpu):
    base = fst.load_config("gsm8k.yaml", ["model.fp32_head=false"])
    plain = {p.name: p.bytes for p in memory.memory_plan(base, 24 * GIB).phases}
    touched = ["training", "base pass", "RL step", "validation"]
    for key in ("model.attn=eager", "model.fp32_head=true"):
        cfg = fst.load_config("gsm8k.yaml", ["model.fp32_head=false", key])
        other = {p.name: p.bytes for p in memory.memory_plan(cfg, 24 * GIB).phases}
        for name, n in plain.items():
            assert other[name] > n if any(name.startswith(t) for t in touched) else other[name] == n, (key, name)
    shape = memory.model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    assert memory.eager_scores_bytes(shape, 2, 700, 700, True) == 12 * 700 * 700 * (2 + 2 + 4 + 2)
