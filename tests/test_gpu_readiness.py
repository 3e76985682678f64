"""What a GPU would hit first, caught on a CPU (issue 29, ../shared/docs/gpu-readiness.md).

Device bugs: a tensor made without a device meets one that has it. On a CPU both sit on the CPU and
nothing shows, so these tests move one side elsewhere: model-side tensors on the `meta` device, or the
default device set to `meta` while the model and its data stay on the CPU (every tensor made without
a device then lands on `meta` and breaks the step). Also: validation in waves, out-of-memory errors,
non-finite logits, the sharing guard on the installed transformers, Qwen3's thinking switch."""
import contextlib
import json
import types

import pytest
import torch

import context_opt
import fst
import rollout
from plumbing import checkpoints, guards, models, seeds

TC = dict(lr=0.01, warmup_steps=0, micro_batch=3)


@contextlib.contextmanager
def default_device(device: str):
    old = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(old)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss", sorted(fst.LOSSES))
def test_every_normaliser_sums_on_the_masks_device(loss):
    """The mask lives where the model is, `group` is CPU bookkeeping (as experience_from makes it): the
    weights must come out on the mask's device (f2c500e: cispo raised, its sums were on the CPU)."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    group = torch.tensor([0, 0, 1], device="cpu")
    on_cpu = fst.token_weights(loss, mask, group, 512)
    on_meta = fst.token_weights(loss, mask.to("meta"), group, 512)
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
    with default_device("meta"):  # nothing of the normaliser may be made on the default device
        again = fst.token_weights(loss, mask, group, 512)
    assert again.device.type == "cpu" and torch.equal(again, on_cpu)
    if loss == "cispo":  # token mean per group, then mean over the 2 groups
        assert torch.allclose(on_cpu, mask * torch.tensor([[1 / 3], [1 / 3], [1 / 3]]) / 2)


@pytest.fixture()
def lora_model(tiny_model_dir):
    seeds.seed_everything(0)
    model, tok = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="float32", lora_r=4, lora_alpha=8),
                                   torch.device("cpu"))
    with torch.no_grad():  # a non-zero B: the policy differs from the base, so KL and every gradient are non-zero
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, tok


def kept_rollouts(ro: rollout.Rollouts, rewards: list[float]) -> list:
    """Two fast-round rollouts of one problem (a group of its own), as fast.reuse keeps them."""
    return [fst.KeptRollout(problem={"id": "kept"}, prompt_id=0, prompt_ids=ro.prompt_ids[i],
                            completion_ids=ro.completion_ids[i], logprobs=ro.logprobs[i], finish_reason="length",
                            text=ro.texts[i], reward=r, feedback="", sampled_at=0, due=1)
            for i, r in zip(range(2), rewards)]


def test_a_training_step_makes_nothing_on_the_default_device(lora_model, tokenizer):
    """The whole slow step with the default device set to `meta` and the model on the CPU: the sampler's
    bookkeeping, experience_from / collate_rollouts, with_reused, base_logprobs, mean_kl, every loss's
    update, the metrics row. A tensor made without a device lands on `meta` and the step raises (f2c500e did)."""
    model, tok = lora_model
    prompts = [rollout.encode_chat(tok, [{"role": "user", "content": q}]) for q in ("Hi", "What is 2 + 3?")]
    with default_device("meta"):
        ro = rollout.sample(model, tok, prompts, [3, 3], max_new_tokens=5, temperature=1.0, max_rows=4,
                            generator=torch.Generator(device="cpu").manual_seed(0))
        scored = [(float(i % 2), "parity") for i in range(6)]
        exp = fst.experience_from([{"id": 0}, {"id": 1}], [0, 0, 0, 1, 1, 1], [0] * 6, ro, scored,
                                  scale_by_std=True, pad_id=tok.pad_token_id, device=torch.device("cpu"))
        exp = fst.with_reused(exp, kept_rollouts(ro, [1.0, 0.0]), scale_by_std=True, pad_id=tok.pad_token_id,
                              device=torch.device("cpu"))
        base_logp = fst.base_logprobs(model, exp.batch, micro_batch=4, chunk=4)
        kl = fst.mean_kl(exp, base_logp)
        stats = {}
        for loss in sorted(fst.LOSSES):
            tc = fst.TrainConfig(loss=loss, **TC)
            optimizer, scheduler = fst.make_optimizer(model, tc)
            stats[loss] = fst.update(model, optimizer, scheduler, exp, base_logp, tc, 5, guards.UpdateGuard(), 0)
        row = fst.train_row(fst.Config(), 0, types.SimpleNamespace(name="parity"), exp, kl, stats["cispo"], 0.01,
                              {"seconds_base_kl": 0.0, "seconds_training": 0.0})
    for t in (exp.group, exp.reward, exp.advantage, exp.keep, exp.sampler_logp, exp.batch.input_ids, base_logp):
        assert t.device.type == "cpu"
    assert len(ro.texts) == 6 and exp.fresh_rows == 6 and len(exp.group) == 8
    assert kl > 0 and all(s.rows == 8 and s.rows_reused == 2 and s.skipped is None for s in stats.values())
    assert row["rows_trained"] == 8 and row["reward_mean"] == pytest.approx(0.5)


def test_validation_runs_in_waves_and_gives_the_numbers_of_one_wave(tiny_model, tokenizer, monkeypatch):
    """200 problems x 4 samples with max_rows=64: 13 waves, the same accuracy (and the same samples) as
    one wave of 800 rows, since each row draws its own uniforms whatever wave it runs in."""
    import eval as evaluation
    import rewards
    task = rewards.get_task("add")
    problems = task.load("test")[:200]
    waves, real = [], rollout._sample_wave

    def counted(*args, **kwargs):
        waves.append(sum(args[3]))
        return real(*args, **kwargs)
    monkeypatch.setattr(rollout, "_sample_wave", counted)
    measure = lambda rows: evaluation.evaluate(tiny_model, tokenizer, task, problems, "Answer.", k=4,  # noqa: E731
                                               max_new_tokens=3, temperature=1.0, max_rows=rows,
                                               generator=torch.Generator().manual_seed(0))
    one = measure(None)
    assert waves == [800]
    waves.clear()
    batched = measure(64)
    assert len(waves) == 13 and max(waves) == 64 and sum(waves) == 800
    assert batched == one


def test_sampler_stops_on_non_finite_logits(tiny_model, tokenizer):
    """NaN logits in some rows stop the call with a line that says how many rows, instead of sampling
    garbage tokens from them."""
    real = tiny_model.forward

    def nan_rows(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits[1:2] = float("nan")
        return out
    tiny_model.forward = nan_rows
    prompt = rollout.encode_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    with pytest.raises(rollout.NonFiniteLogits, match="in 1 of 3 rows at new token 1"):
        rollout.sample(tiny_model, tokenizer, [prompt], [3], max_new_tokens=4, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))


def test_sharing_guard_follows_checkpointing_through_the_public_api(tiny_model):
    """The two-pass (shared prompt) training path is only right when the layers keep the cache: the
    guard must see checkpointing turned on and off on the installed transformers."""
    body = tiny_model.get_decoder()
    tiny_model.train()
    assert rollout._can_share_prompts(body)
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert rollout.checkpointing_on(body) and not rollout._can_share_prompts(body)
    tiny_model.eval()
    assert rollout._can_share_prompts(body)  # layers checkpoint in train mode only
    tiny_model.train()
    tiny_model.gradient_checkpointing_disable()
    assert not rollout.checkpointing_on(body) and rollout._can_share_prompts(body)
    tiny_model.eval()


QWEN3_STYLE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n"
               "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
               "{% endif %}")


def test_chat_prompts_turn_thinking_off_where_the_template_can(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    plain = tokenizer.decode(rollout.encode_chat(tokenizer, msgs))
    assert "<think>" not in plain
    old = tokenizer.chat_template
    tokenizer.chat_template = QWEN3_STYLE
    try:
        text = tokenizer.decode(rollout.encode_chat(tokenizer, msgs))
    finally:
        tokenizer.chat_template = old
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def _run(tmp_path, model_dir, steps, extra=(), resume=False):
    run_dir = tmp_path / "oom"
    args = (["--resume", str(run_dir)] if resume else
            ["--config", "tiny.yaml", "--set", f"model.name={model_dir}", "--set", f"out_dir={tmp_path}",
             "--set", "run_name=oom", "--set", "train.save_every=100", "--set", "sampling.max_new_tokens=6",
             "--set", "train.batch_size=2", "--set", "sampling.group_size=4", "--set", "train.lr=0.01",
             "--set", "mode=fst", "--set", "fast.every=2", "--set", "fast.budget=1",
             "--set", "fast.reflector_max_new_tokens=6", "--set", "eval.every=2", "--set", "eval.n=3",
             "--set", "eval.k=2"])
    fst.main(args + ["--set", f"train.steps={steps}", *extra])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds") and k != "tokens_per_s"} for r in rows]


def test_out_of_memory_saves_the_last_whole_step_and_resume_goes_on(tmp_path, tiny_model_dir, parity_rewards,
                                                                    monkeypatch):
    """An out-of-memory error in the validation after step 2 (no checkpoint due there) saves step 1
    (the last whole one), exits with one line naming the keys to lower, and --resume redoes the cut-off
    validation and finishes as an uninterrupted run does. At step 0 seed and best are one text: one
    evaluation, two rows."""
    reference = _run(tmp_path / "ref", tiny_model_dir, 4)
    evals = [r for r in reference if r.get("kind") == "eval"]
    assert [(r["step"], r["prompt"]) for r in evals][:2] == [(0, "seed"), (0, "best")]
    real, calls = context_opt.measure_accuracy, []

    def oom_on_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)
    monkeypatch.setattr(context_opt, "measure_accuracy", oom_on_second_validation)
    with pytest.raises(SystemExit) as stop:
        _run(tmp_path, tiny_model_dir, 4)
    line = str(stop.value)
    assert "out of memory" in line and "saved step 1" in line and "sampling.max_rows" in line
    assert "\n" not in line and len(calls) == 2  # step 0's seed == best: measured once
    assert (tmp_path / "oom" / "checkpoints" / "step_000001").is_dir()
    monkeypatch.setattr(context_opt, "measure_accuracy", real)
    resumed = _run(tmp_path, tiny_model_dir, 4, resume=True)
    assert strip(resumed) == strip(reference)


def test_out_of_memory_frees_the_failed_frames_before_saving(tmp_path):
    """The tensors of the frames an out-of-memory error unwound (a sampler's KV cache, say) are freed
    before the save: the traceback held them, and a save on a full card could fail in turn."""
    import weakref
    cache = []

    def sample_into_oom():
        kv = torch.ones(1000)                        # the failed frame's tensor
        cache.append(weakref.ref(kv))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    alive_when_saved = []
    with pytest.raises(SystemExit, match="saved step 3"):
        with guards.checkpoint_on_interrupt(lambda step: alive_when_saved.append(cache[0]() is not None),
                                            tmp_path) as progress:
            progress.done = 3
            sample_into_oom()
    assert alive_when_saved == [False]


def test_non_finite_logits_save_the_last_whole_step_and_resume_goes_on(tmp_path, tiny_model_dir, parity_rewards,
                                                                       monkeypatch, capsys):
    """Non-finite logits in step 2's sampling (no checkpoint due since the start) stop the run with one
    line, after saving step 1, the last whole one; --resume finishes as an uninterrupted run does."""
    reference = _run(tmp_path / "ref", tiny_model_dir, 4, ["--set", "eval.every=0", "--set", "mode=rl"])
    real = fst.make_experience

    def nan_at_step_2(cfg, run, task, batch, step):
        if step == 2:
            raise rollout.NonFiniteLogits("non-finite logits in 1 of 8 rows at new token 3 of a sampler call")
        return real(cfg, run, task, batch, step)
    monkeypatch.setattr(fst, "make_experience", nan_at_step_2)
    with pytest.raises(SystemExit, match="training error: non-finite logits"):
        _run(tmp_path, tiny_model_dir, 4, ["--set", "eval.every=0", "--set", "mode=rl"])
    assert "saved step 1" in capsys.readouterr().err
    assert checkpoints.latest_checkpoint(tmp_path / "oom").name == "step_000001"
    monkeypatch.setattr(fst, "make_experience", real)
    resumed = _run(tmp_path, tiny_model_dir, 4, resume=True)
    assert strip(resumed) == strip(reference)


def nan_where_nothing_is_attended(monkeypatch):
    """SDPA as some fused CUDA kernels behave: NaN at a query row whose boolean mask allows no key (the CPU
    kernel returns 0 there, so a CPU run cannot show the NaN otherwise)."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, **kwargs):
        out = real(query, key, value, attn_mask=attn_mask, **kwargs)                           # [R, h, Q, D]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            out = out.masked_fill(~attn_mask.any(-1)[..., None], float("nan"))
        return out
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


@pytest.mark.parametrize("share", [False, True])
def test_left_padded_rows_stay_finite_when_sdpa_gives_nan_at_pad_queries(tiny_model_dir, monkeypatch, share):
    """The training pass and the KL pass (adapter off) on left-padded rows: finite log-probs and gradients,
    equal to the kernel that returns 0 at pad queries, though pad queries come back NaN from attention;
    the sampler's prefill alike."""
    model, tok = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="float32", attn="sdpa", lora_r=4,
                                                      lora_alpha=8), torch.device("cpu"))
    prompts = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batch = rollout.collate(prompts, [[20, 21, 22], [23, 24], [25, 26, 27], [28]], tok.pad_token_id, "cpu")
    m = batch.completion_mask.bool()

    def passes():
        logp = rollout.sequence_logprobs(model, batch, chunk_size=2, share_prompts=share)
        grads = torch.autograd.grad(logp[m].sum(), [p for p in model.parameters() if p.requires_grad])
        with torch.no_grad(), model.disable_adapter():
            base = rollout.sequence_logprobs(model, batch, chunk_size=2, share_prompts=share)
        return logp.detach(), base, grads
    want, greedy = passes(), rollout.sample(model, tok, prompts, [1] * 4, max_new_tokens=4, temperature=0)
    nan_where_nothing_is_attended(monkeypatch)
    got = passes()
    # the sampler's left-padded prefill too (its NaN check would stop the call)
    assert rollout.sample(model, tok, prompts, [1] * 4, max_new_tokens=4, temperature=0).completion_ids == \
        greedy.completion_ids
    for g, w in zip(got[:2], want[:2]):
        assert torch.isfinite(g[m]).all()
        torch.testing.assert_close(g[m], w[m], atol=1e-5, rtol=0)
    assert all(torch.isfinite(g).all() for g in got[2])
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got[2], want[2]))
