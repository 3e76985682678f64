"""rollout.py: the sampler agrees with model.generate, its log-probs agree with the training-side
recomputation, finished rows leave the batch, and chunked log-probs equal the full computation."""
import pytest
import torch

import rollout
from plumbing import models

QUESTIONS = ["Hi", "What is 2 + 3? Think step by step, then answer.", "Name a colour."]


pytestmark = pytest.mark.usefixtures("one_thread")


def chat_prompts(tokenizer):
    prompts = [rollout.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    return prompts


def add_lora(model):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero (adapter = identity); randomise it so LoRA matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def favour_eos(model, eos):
    """Make EOS the greedy choice whenever the raw argmax is divisible by 14: rows then finish at
    different, deterministic steps (the hook sits on lm_head, so every consumer sees it)."""
    def hook(module, args, out):
        out = out.clone()
        out[..., eos] += 1e3 * (out.argmax(-1) % 14 == 0)
        return out
    return model.get_output_embeddings().register_forward_hook(hook)


def greedy_reference(model, tokenizer, prompt, n):
    """One prompt at a time (no padding): the unambiguous reference."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt):].tolist()


def batch_sizes_spy(model):
    sizes = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape), with_kwargs=True)
    return sizes, handle


def test_encode_chat(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = rollout.encode_chat(tokenizer, msgs)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("lora", [False, True])
def test_greedy_matches_generate(tiny_model, tokenizer, lora, monkeypatch):
    monkeypatch.setattr(rollout._GrowingLayer, "block", 3)  # the KV buffers grow several times
    prompts, counts, n = chat_prompts(tokenizer), [2, 1, 3], 16
    model = add_lora(tiny_model) if lora else tiny_model
    ro = rollout.sample(model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0)
    assert ro.prompt_index == [0, 0, 1, 2, 2, 2]
    refs = [greedy_reference(model, tokenizer, p, n) for p in prompts]
    for i, comp, reason in zip(ro.prompt_index, ro.completion_ids, ro.finish_reasons):
        assert comp == refs[i]
        assert reason == ("eos" if refs[i][-1] == tokenizer.eos_token_id else "length")
    if lora:  # the adapter really changes the outputs, so the match above covers LoRA
        with model.disable_adapter():
            base = rollout.sample(model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0)
        assert base.completion_ids != ro.completion_ids


def test_eos_rows_leave_the_batch_and_still_match_generate(tiny_model, tokenizer):
    prompts, counts, n, eos = chat_prompts(tokenizer), [2, 2, 2], 14, tokenizer.eos_token_id
    favour_eos(tiny_model, eos)
    sizes, spy = batch_sizes_spy(tiny_model)
    ro = rollout.sample(tiny_model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0)
    spy.remove()
    assert set(ro.finish_reasons) == {"eos", "length"}  # ragged: some rows stop early
    refs = [greedy_reference(tiny_model, tokenizer, p, n) for p in prompts]
    for i, comp, reason, text in zip(ro.prompt_index, ro.completion_ids, ro.finish_reasons, ro.texts):
        assert comp == refs[i]
        assert (reason == "eos") == (comp[-1] == eos) and eos not in comp[:-1]
        assert text == tokenizer.decode(comp, skip_special_tokens=True)
    # sizes[0] is the prefill of 3 distinct prompts; decode steps then shrink as rows finish.
    decode_rows = [s[0] for s in sizes[1:]]
    assert sizes[0] == (3, max(map(len, prompts)))
    assert decode_rows[0] == 6 and decode_rows == sorted(decode_rows, reverse=True)
    assert sum(decode_rows) + 6 == ro.decode_tokens == sum(map(len, ro.completion_ids))
    finished_at = [len(c) for c in ro.completion_ids]
    assert decode_rows[-1] == sum(k == max(finished_at) for k in finished_at) < 6


def test_stop_string_cuts_text_and_frees_rows(tiny_model, tokenizer):
    prompts, counts, n = chat_prompts(tokenizer), [2, 1, 1], 12
    free = rollout.sample(tiny_model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0)
    text0, dec = free.texts[0], lambda k: tokenizer.decode(free.completion_ids[0][:k])
    # a stop string from inside token 2 to inside token 4: it spans three tokens and completes at the 5th
    stop = text0[len(dec(2)) + 1:len(dec(5)) - 1]
    assert len(stop) > 6 and not any(stop in t for t in free.texts[2:])
    sizes, spy = batch_sizes_spy(tiny_model)
    ro = rollout.sample(tiny_model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0, stop=[stop])
    spy.remove()
    assert ro.finish_reasons == ["stop", "stop", "length", "length"]
    cut = text0[:text0.find(stop) + len(stop)]
    assert ro.texts[:2] == [cut, cut] and ro.texts[2:] == free.texts[2:]
    assert ro.completion_ids[:2] == [free.completion_ids[0][:5]] * 2 and ro.completion_ids[2:] == free.completion_ids[2:]
    assert [s[0] for s in sizes[1:]] == [4] * 4 + [2] * (n - 5)  # the two stopped rows left the batch


def test_generation_config_eos_ids_also_end_rows(tiny_model, tokenizer):
    prompts = chat_prompts(tokenizer)
    free = rollout.sample(tiny_model, tokenizer, prompts, [1, 1, 1], max_new_tokens=8, temperature=0)
    extra = free.completion_ids[0][3]  # say the model config declares a second end-of-turn token
    tiny_model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    ro = rollout.sample(tiny_model, tokenizer, prompts, [1, 1, 1], max_new_tokens=8, temperature=0)
    k = free.completion_ids[0].index(extra) + 1
    assert ro.completion_ids[0] == free.completion_ids[0][:k] and ro.finish_reasons[0] == "eos"


def test_sampling_reproducible_counts_and_waves(tiny_model, tokenizer):
    prompts, counts = chat_prompts(tokenizer), [3, 0, 2]
    draw = lambda seed, **kw: rollout.sample(tiny_model, tokenizer, prompts, counts, max_new_tokens=8,
                                             temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = draw(0), draw(0), draw(1)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    assert len(set(map(tuple, a.completion_ids[:3]))) > 1  # the group's samples differ
    assert a.prompt_index == [0, 0, 0, 2, 2]
    assert a.prompt_ids == [prompts[0]] * 3 + [prompts[2]] * 2
    assert all(len(l) == len(t) for l, t in zip(a.logprobs, a.completion_ids))
    assert a.prefill_tokens == len(prompts[0]) + len(prompts[2])  # one prefill per distinct prompt
    assert a.decode_tokens == 5 * 8 and a.finish_reasons == ["length"] * 5 and a.seconds > 0
    # identical prompts share one prefill row; waves (batch_size) give the same greedy samples
    dup = rollout.sample(tiny_model, tokenizer, [prompts[1]] * 2, [1, 2], max_new_tokens=4, temperature=0)
    assert dup.prefill_tokens == len(prompts[1]) and dup.prompt_index == [0, 1, 1]
    greedy = lambda **kw: rollout.sample(tiny_model, tokenizer, prompts, [1, 2, 1], max_new_tokens=6,
                                         temperature=0, **kw).completion_ids
    ref = greedy()
    assert greedy(batch_size=1, progress=True) == ref
    # max_rows: waves of at most that many rows, a prompt's samples split over waves when it has more
    assert greedy(max_rows=1) == ref and greedy(max_rows=3) == ref
    split = rollout.sample(tiny_model, tokenizer, prompts, [1, 2, 1], max_new_tokens=6, temperature=0, max_rows=1)
    assert split.prompt_index == [0, 1, 1, 2] and split.prompt_ids == [prompts[0]] + [prompts[1]] * 2 + [prompts[2]]
    # a model left in train mode with gradient checkpointing and use_cache=False still decodes with
    # the cache, without dropout, and is handed back in train mode
    tiny_model.config.use_cache = False
    tiny_model.activation_checkpointing_enable()
    tiny_model.train()
    assert greedy() == ref and tiny_model.training
    tiny_model.eval()
    # a vanishing nucleus is greedy
    nucleus = rollout.sample(tiny_model, tokenizer, prompts, [1, 2, 1], max_new_tokens=6, temperature=1.0,
                             top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert nucleus.completion_ids == ref


def test_sampling_waves_bound_rows_and_keep_prompt_order():
    waves = rollout.sampling_waves(["a", "b", "c", "d"], [2, 0, 5, 1], max_rows=3)
    assert waves == [(0, ["a", "b", "c"], [2, 0, 1]), (2, ["c"], [3]), (2, ["c", "d"], [1, 1])]
    assert all(sum(counts) <= 3 for _, _, counts in waves)
    assert rollout.sampling_waves(["a", "b", "c"], [2, 0, 5]) == [(0, ["a", "b", "c"], [2, 0, 5])]  # one wave
    assert rollout.sampling_waves(["a", "b", "c"], [1, 1, 1], batch_size=2) == [(0, ["a", "b"], [1, 1]), (2, ["c"], [1])]
    assert rollout.sampling_waves([], []) == []


@pytest.mark.parametrize("variant", ["plain", "eos", "lora"])
def test_sampler_logprobs_equal_recomputed(tiny_model, tokenizer, variant):
    model = add_lora(tiny_model) if variant == "lora" else tiny_model
    if variant == "eos":
        favour_eos(model, tokenizer.eos_token_id)
    ro = rollout.sample(model, tokenizer, chat_prompts(tokenizer), [2, 1, 2], max_new_tokens=10,
                        temperature=0.8, generator=torch.Generator().manual_seed(3))
    if variant == "eos":
        assert len(set(map(len, ro.completion_ids))) > 1  # ragged completions: right padding is used
    batch = rollout.collate(ro.prompt_ids, ro.completion_ids, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp, ent = rollout.sequence_logprobs(model, batch, chunk_size=4, with_entropy=True)
    for r, lps in enumerate(ro.logprobs):
        torch.testing.assert_close(logp[r, :len(lps)], torch.tensor(lps), atol=1e-4, rtol=0)
    assert torch.isfinite(logp).all() and (ent > -1e-4).all()


def test_sequence_logprobs_match_full_forward_with_grad_through_lora(tiny_model, tokenizer):
    model = add_lora(tiny_model)
    prompts = chat_prompts(tokenizer)
    comps = [[5, 6, 7, 8], [9], [10, 11, tokenizer.eos_token_id]]
    batch = rollout.collate(prompts, comps, tokenizer.pad_token_id, "cpu")
    logp = rollout.sequence_logprobs(model, batch, chunk_size=2)
    P, T = batch.prompt_width, batch.completion_mask.shape[1]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    ref = full[:, P - 1:P - 1 + T].log_softmax(-1).gather(-1, batch.input_ids[:, P:, None]).squeeze(-1)
    m = batch.completion_mask.bool()
    torch.testing.assert_close(logp[m], ref[m], atol=1e-5, rtol=1e-5)
    (logp * batch.completion_mask).sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    with torch.no_grad(), model.disable_adapter():  # the adapter is live inside get_decoder()
        assert not torch.allclose(rollout.sequence_logprobs(model, batch)[m], logp.detach()[m], atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logprobs_equal_full_values_and_grads(chunk):
    torch.manual_seed(0)
    R, T, H, V = 3, 7, 16, 50
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(R, T, H, requires_grad=True)
    y = torch.randint(0, V, (R, T))
    w = torch.randn(R, T)  # arbitrary upstream gradient

    saved = []  # sizes of tensors autograd keeps for backward (outside the checkpoints)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, ent = rollout.chunked_logprobs(head, hidden, y, chunk, with_entropy=True)
    (logp * w).sum().backward()
    got = logp.detach(), ent, hidden.grad.clone(), head.weight.grad.clone()
    assert not ent.requires_grad
    assert max(saved, default=0) < R * T * V  # no [R, T, V] tensor is kept for backward

    hidden.grad = head.weight.grad = None
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        full = head(hidden).log_softmax(-1)
    assert max(saved) >= R * T * V  # the naive way does keep one (so the check above can fail)
    (full.gather(-1, y[..., None]).squeeze(-1) * w).sum().backward()
    ref_ent = -(full.exp() * full).sum(-1).detach()
    want = full.gather(-1, y[..., None]).squeeze(-1).detach(), ref_ent, hidden.grad, head.weight.grad
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and without grad
        torch.testing.assert_close(rollout.chunked_logprobs(head, hidden, y, chunk), want[0], atol=1e-5, rtol=1e-5)


def test_collate_layout():
    b = rollout.collate([[1, 2, 3], [4]], [[5], [6, 7, 8]], pad_id=0, device="cpu")
    assert b.prompt_width == 3
    assert b.input_ids.tolist() == [[1, 2, 3, 5, 0, 0], [0, 0, 4, 6, 7, 8]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b.completion_mask.tolist() == [[1, 0, 0], [1, 1, 1]] and b.completion_mask.is_floating_point()


def test_attn_implementation():
    assert models.attn_implementation() in ("sdpa", "flash_attention_2")
    if not torch.cuda.is_available():
        assert models.attn_implementation() == "sdpa"


# ------------------------------------------------------------------ shared-prompt log-prob passes
def group_batch(tokenizer, layout):
    """Rows of an RL step: groups of completions sharing a prompt, interleaved so the row -> prompt map
    is not just contiguous blocks."""
    p = chat_prompts(tokenizer)
    eos = tokenizer.eos_token_id
    if layout == "two_prompts":  # 2 prompts of different lengths x 3 completions of different lengths
        prompts = [p[1], p[0], p[1], p[0], p[1], p[0]]
        comps = [[5, 6, 7, 8, 9], [11, eos], [12, 13], [14, 15, 16, 17, 18, 19, 20], [21], [22, 23, 24, eos]]
    elif layout == "no_padding":  # one prompt, equal lengths: no padding anywhere in the mask
        prompts, comps = [p[2]] * 3, [[5, 6, 7], [8, 9, 10], [11, 12, eos]]
    elif layout == "one_token":  # T == 1: only the prompt pass predicts anything
        prompts, comps = [p[0], p[1], p[0], p[1]], [[5], [6], [eos], [7]]
    else:  # "distinct": nothing to share
        prompts, comps = p, [[5, 6], [7, 8, 9], [10]]
    return rollout.collate(prompts, comps, tokenizer.pad_token_id, "cpu")


def logprob_run(model, batch, share, grad=True):
    """(logp, entropy, LoRA grads, decoder input shapes, LoRA input shapes) of one sequence_logprobs call."""
    model.zero_grad(set_to_none=True)
    sizes, spy = batch_sizes_spy(model)
    lora_a = model.get_decoder().layers[0].self_attn.v_proj.lora_A["default"]
    lora_sizes = []
    spy_lora = lora_a.register_forward_hook(lambda m, args, out: lora_sizes.append(tuple(args[0].shape[:2])))
    with torch.set_grad_enabled(grad):
        logp, ent = rollout.sequence_logprobs(model, batch, chunk_size=3, with_entropy=True, share_prompts=share)
    spy.remove()
    spy_lora.remove()
    grads = {}
    if grad:
        (logp * batch.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return logp.detach(), ent, grads, [tuple(s) for s in sizes], lora_sizes


def assert_grads_close(got, want, name):
    """rtol 1e-4, with an absolute floor of 1e-4 x the tensor's largest entry: float32 summation order
    differs between the paths, so entries near zero carry ~1e-6 x max of rounding noise."""
    scale = want.abs().max()
    assert scale > 0, name
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale.item(),
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["two_prompts", "no_padding", "one_token", "distinct"])
def test_shared_prompt_logprobs_equal_single_pass(tiny_model, tokenizer, layout):
    model = add_lora(tiny_model).train()  # the training pass runs in train mode (lora_dropout is 0)
    batch = group_batch(tokenizer, layout)
    R, P, T = batch.input_ids.shape[0], batch.prompt_width, batch.completion_mask.shape[1]
    U = len({tuple(r) for r in batch.input_ids[:, :P].tolist()})
    shared, single = logprob_run(model, batch, True), logprob_run(model, batch, False)

    # the shapes say which path ran: each distinct prompt once, then the completion columns (the last
    # one predicts nothing); LoRA is live in both passes
    assert single[3] == [(R, P + T)] and single[4] == [(R, P + T)]
    if layout == "distinct":
        assert shared[3] == shared[4] == [(R, P + T)]
    else:
        want = [(U, P)] + ([(R, T - 1)] if T > 1 else [])
        assert U < R and shared[3] == want and shared[4] == want

    m = batch.completion_mask.bool()
    torch.testing.assert_close(shared[0][m], single[0][m], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1][m], single[1][m], atol=1e-5, rtol=0)
    assert shared[2].keys() == single[2].keys() and len(shared[2]) == 12
    for name in single[2]:  # the gradients flow through the expanded cache back to the prompt pass
        assert_grads_close(shared[2][name], single[2][name], name)


def test_shared_prompt_logprobs_base_pass_and_checkpointing_fallback(tiny_model, tokenizer):
    model = add_lora(tiny_model)
    batch = group_batch(tokenizer, "two_prompts")
    R, P, T = batch.input_ids.shape[0], batch.prompt_width, batch.completion_mask.shape[1]
    m = batch.completion_mask.bool()
    with torch.no_grad():
        with_adapter = rollout.sequence_logprobs(model, batch)
    # the base-model KL pass: no grad, adapter off -- in both passes of the shared path
    with model.disable_adapter():
        base_shared = logprob_run(model, batch, True, grad=False)
        base_single = logprob_run(model, batch, False, grad=False)
    assert base_shared[3] == [(2, P), (R, T - 1)] and base_shared[4] == []  # LoRA never ran
    torch.testing.assert_close(base_shared[0][m], base_single[0][m], atol=1e-5, rtol=0)
    assert not torch.allclose(base_shared[0][m], with_adapter[m], atol=1e-3)

    # gradient checkpointing in train mode drops the cache: the single pass runs instead, and matches
    tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.enable_input_require_grads()
    model.train()
    ckpt = logprob_run(model, batch, True)
    assert ckpt[3] == [(R, P + T)]
    model.eval()  # checkpointing only acts in train mode, so eval may share
    assert logprob_run(model, batch, True, grad=False)[3] == [(2, P), (R, T - 1)]
    tiny_model.activation_checkpointing_disable()
    model.train()
    ref = logprob_run(model, batch, False)
    torch.testing.assert_close(ckpt[0][m], ref[0][m], atol=1e-5, rtol=0)
    for name in ref[2]:
        assert_grads_close(ckpt[2][name], ref[2][name], name)


QWEN_VOCAB = 151_936  # a realistic vocabulary: the inverse CDF's running sum spans all of it


def high_entropy_rows(rows: int, generator) -> torch.Tensor:
    """log-softmax rows [rows, QWEN_VOCAB] whose best token has log-prob about -5: a flat next-token
    distribution, where low temperatures must still find the few likely tokens."""
    logits = torch.randn(rows, QWEN_VOCAB, generator=generator) * 2.0
    return logits.log_softmax(-1)


@pytest.mark.parametrize("temperature", [0.01, 0.05])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_pick_at_low_temperature_draws_likely_tokens(temperature, top_p):
    g = torch.Generator().manual_seed(0)
    logp = high_entropy_rows(4, g)
    assert (logp.amax(-1) < -3).all()  # the case that underflowed: exp(max / T) is 0 in float32
    tempered = (logp / temperature).double().softmax(-1)                                     # [4, V]
    for u in torch.linspace(0.001, 0.999, 9):
        tok = rollout._pick(logp, temperature, top_p, torch.full((4,), float(u)))
        assert (tok >= 0).all() and (tok < QWEN_VOCAB).all()
        p = tempered.gather(-1, tok[:, None]).squeeze(-1)
        assert (p > 1e-3).all(), (u, tok, p)  # a likely token, not the last id nor an arbitrary one


def sampled_distribution(logp, temperature, monkeypatch) -> torch.Tensor:
    """The distribution _pick draws from, exactly: a uniform u picks the first CDF entry above
    u * total, so token i has probability (cdf[i] - cdf[i-1]) / total. The CDF is read from the
    searchsorted call, in whatever precision _pick built it."""
    seen = []
    real = torch.searchsorted

    def spy(cdf, values, **kw):
        seen.append(cdf.clone())
        return real(cdf, values, **kw)

    monkeypatch.setattr(torch, "searchsorted", spy)
    rollout._pick(logp, temperature, 1.0, torch.rand(logp.shape[0]))
    monkeypatch.setattr(torch, "searchsorted", real)
    cdf = seen[0].double()                                                                    # [B, V]
    return torch.diff(cdf, dim=-1, prepend=cdf.new_zeros(cdf.shape[0], 1)) / cdf[:, -1:]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_pick_samples_the_recorded_distribution_exactly(temperature, monkeypatch):
    """The loss reads the sampler's recorded log-probs as the behaviour policy: the distribution the
    inverse CDF draws from must be softmax(logp / T) to 1e-6 in total variation, at a real vocabulary
    size, and every token of non-negligible probability must be reachable."""
    g = torch.Generator().manual_seed(1)
    logp = torch.cat([high_entropy_rows(2, g), (torch.randn(2, QWEN_VOCAB, generator=g) * 5).log_softmax(-1)])
    want = (logp.double() / temperature).log_softmax(-1).exp()                                # [4, V]
    got = sampled_distribution(logp, temperature, monkeypatch)
    tv = 0.5 * (got - want).abs().sum(-1)                                                     # [4]
    assert (tv < 1e-6).all(), tv
    assert not ((got == 0) & (want > 1e-9)).any()  # no reachable-in-theory token is cut off
