"""rollout.py, shared prompt prefixes: the planner's cuts, the same greedy tokens and log-probs with and
without sharing (Llama- and Qwen2-shaped tiny models, padding, EOS, stop strings), the same training
log-probs and gradients, the old path when nothing is shared, and micro-batches of rows sharing a context."""
import pytest
import torch

import fst
import rollout
from test_rollout import add_lora, assert_grads_close, batch_sizes_spy, favour_eos, greedy_reference

PROBLEMS = ["What is 2 + 3?", "Name a colour that starts with the letter b, please.", "Hi"]
DEMO = ("What is 4 + 4?", "4 + 4 = 8.\nAnswer: 8")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny_qwen2(tokenizer):
    """A 2-layer Qwen2 (biased q/k/v projections, its own rope settings) with SmolLM2's vocabulary; a
    fresh one per test, as conftest's tiny_model (tests add hooks and LoRA layers to it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, rope_theta=1e6, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # decisive greedy choices, as conftest's tiny Llama; non-zero biases
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("bias"):
                p.normal_(0, 0.2)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(params=["tiny_model", "tiny_qwen2"])
def any_model(request):
    return request.getfixturevalue(request.param)


FIRST = "Solve the word problem. Reason briefly, then give the final answer on a last line. " * 4
OTHER = "You are a careful assistant. Read the question twice and answer it in one short sentence. " * 5
THIRD = "Answer in the fewest words you can; a number alone is best, and never explain yourself. " * 4
# Context 1 is context 0 plus a worked example (both share the whole system message, as a parent and
# the child a demo operator made of it); context 2 is another instruction.
MIXED = [(FIRST, []), (FIRST, [DEMO]), (OTHER, [])]
APART = [(FIRST, []), (OTHER, []), (THIRD, [])]


def context_prompts(tokenizer, contexts=MIXED, lone=True):
    """Prompts as FST builds them: contexts (a system message, worked examples as turns) x problems,
    problem-major as fst.plan_rollouts orders them. Problems differ in length, so prefixes and suffixes
    both need padding. lone: one more prompt, the template's default system message and a short
    question, that shares nothing."""
    def chat(system, demos, problem):
        turns = [m for q, a in demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return rollout.encode_chat(tokenizer, [{"role": "system", "content": system}, *turns,
                                               {"role": "user", "content": problem}])
    prompts = [chat(system, demos, p) for p in PROBLEMS for system, demos in contexts]
    if lone:
        prompts.append(rollout.encode_chat(tokenizer, [{"role": "user", "content": "Hello there"}]))
    return prompts


# ------------------------------------------------------------------------------------ the planner
def test_plan_cuts_sorted_prompts_into_runs_that_save_the_most(monkeypatch):
    monkeypatch.setattr(rollout, "MIN_SHARED_PREFIX", 4)
    head = [9, 9, 9]                                   # shared by every prompt, below the threshold
    a, b = head + [1] * 11, head + [1] * 5 + [2] * 6   # two contexts sharing 8 of 14 tokens, a third apart
    c = head + [3] * 6
    prompts = [a + [5], b + [6], c + [5, 5], a + [6, 6], b + [7], c + [6], [4, 4, 4, 4, 4], a]
    plan = rollout.plan_prefixes(prompts)
    for u, p in enumerate(prompts):  # every prompt is its prefix row, then its suffix
        assert plan.prefixes[plan.prefix_of[u]] + plan.suffixes[u] == p
    rows = {tuple(plan.prefixes[plan.prefix_of[u]]) for u in (0, 3, 7)}
    assert rows == {tuple(a)}                          # a's three prompts (one is all prefix) share a
    assert plan.suffixes[7] == []
    assert plan.prefixes[plan.prefix_of[1]] == plan.prefixes[plan.prefix_of[4]] == b  # not the 8 tokens
    assert plan.prefixes[plan.prefix_of[2]] == plan.prefixes[plan.prefix_of[5]] == c  # a and b share
    assert plan.prefixes[plan.prefix_of[6]] == prompts[6] and plan.suffixes[6] == []  # shares nothing
    assert len(plan.prefixes) == 4 and plan.shares
    saved = sum(map(len, prompts)) - sum(map(len, plan.prefixes)) - sum(map(len, plan.suffixes))
    assert saved == 2 * len(a) + len(b) + len(c)


def test_plan_stays_unshared_below_the_threshold_or_when_padding_eats_the_gain(monkeypatch):
    prompts = [[7] * 40 + [1], [7] * 40 + [2, 2], [8] * 30]
    monkeypatch.setattr(rollout, "MIN_SHARED_PREFIX", 41)
    assert rollout.plan_prefixes(prompts) == rollout.PrefixPlan.unshared(prompts)
    monkeypatch.setattr(rollout, "MIN_SHARED_PREFIX", 40)
    assert rollout.plan_prefixes(prompts).shares
    # Two long prompts share 40 tokens, but the suffix pass would pad every other prompt to their
    # 60-token suffixes: Q x A + U x S = 5 x 100 + 6 x 60 > U x P = 6 x 100.
    long = [[7] * 40 + [1] * 60, [7] * 40 + [2] * 60] + [[3 + k] * 100 for k in range(4)]
    assert rollout.plan_prefixes(long) == rollout.PrefixPlan.unshared(long)
    assert rollout.plan_prefixes(long[:2]).shares  # alone they pay: 1 x 40 + 2 x 60 < 2 x 100


# ------------------------------------------------------------------------------------ the sampler
def test_greedy_samples_equal_with_and_without_sharing(any_model, tokenizer):
    """Across prefix rows of different lengths, padded suffixes, a prompt that shares nothing, rows
    ending at EOS and at a stop string: the same tokens, texts and finish reasons, log-probs within
    float tolerance, and the tokens generate() gives for each prompt alone."""
    model, prompts = any_model, context_prompts(tokenizer)
    counts, n = [2, 1, 1, 1, 2, 1, 1, 1, 2, 1], 10
    favour_eos(model, tokenizer.eos_token_id)
    free = rollout.sample(model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0, share_prefix=False)
    r = next(r for r, c in enumerate(free.completion_ids) if len(c) == n)  # a row running to the end
    text, dec = free.texts[r], lambda k: tokenizer.decode(free.completion_ids[r][:k])
    stop = text[len(dec(2)):len(dec(5))]  # completes at the row's 5th token
    assert stop.strip()

    runs = {}
    for share in (True, False):
        sizes, spy = batch_sizes_spy(model)
        runs[share] = rollout.sample(model, tokenizer, prompts, counts, max_new_tokens=n, temperature=0,
                                     stop=[stop], share_prefix=share), sizes
        spy.remove()
    (shared, shared_sizes), (plain, plain_sizes) = runs[True], runs[False]
    assert {"stop", "eos", "length"} <= set(plain.finish_reasons)
    for field in ("prompt_index", "prompt_ids", "completion_ids", "finish_reasons", "texts", "decode_tokens"):
        assert getattr(shared, field) == getattr(plain, field), field
    for a, b in zip(shared.logprobs, plain.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    for i, comp in zip(shared.prompt_index, shared.completion_ids):  # generate(), one prompt at a time
        ref = greedy_reference(model, tokenizer, prompts[i], n)
        assert comp == ref[:len(comp)]

    plan = rollout.plan_prefixes(prompts)  # FIRST's two contexts share a row, OTHER one, the lone prompt its own
    Q, U, P = len(plan.prefixes), len(prompts), max(map(len, prompts))
    assert Q == 3 and plan.prefixes[plan.prefix_of[-1]] == prompts[-1]
    assert len({len(p) for p in plan.prefixes}) == 3 and len({len(s) for s in plan.suffixes}) > 3
    A, S = max(map(len, plan.prefixes)), max(map(len, plan.suffixes))
    assert shared_sizes[:2] == [(Q, A), (U, S)] and plain_sizes[0] == (U, P)   # two prefill passes, one
    assert shared_sizes[2:] == plain_sizes[1:]                                  # then the same decode steps
    assert plain.prefill_tokens == sum(map(len, prompts))
    assert shared.prefill_tokens == sum(map(len, plan.prefixes)) + sum(map(len, plan.suffixes))


def test_sampler_shares_only_where_it_pays(tiny_model, tokenizer, monkeypatch):
    """Prompts that share fewer than MIN_SHARED_PREFIX tokens take the old path: one prefill of the
    distinct prompts. The same prompts with the threshold lowered do share (so the check can fail)."""
    prompts = [rollout.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in PROBLEMS]
    common = rollout._common_length(prompts[0], prompts[1])   # the template's default system message
    assert 16 < common < rollout.MIN_SHARED_PREFIX
    P = max(map(len, prompts))

    def prefill_calls():
        sizes, spy = batch_sizes_spy(tiny_model)
        ro = rollout.sample(tiny_model, tokenizer, prompts, [2, 1, 1], max_new_tokens=1, temperature=0)
        spy.remove()
        return sizes, ro  # max_new_tokens=1: every forward is a prefill

    sizes, ro = prefill_calls()
    assert sizes == [(3, P)] and ro.prefill_tokens == sum(map(len, prompts))
    monkeypatch.setattr(rollout, "MIN_SHARED_PREFIX", 16)
    sizes, shared = prefill_calls()
    assert len(sizes) == 2 and sizes[0] == (1, common) and shared.prefill_tokens == ro.prefill_tokens - 2 * common
    assert shared.completion_ids == ro.completion_ids


# ------------------------------------------------------------------------------ the scoring passes
def rl_batch(tokenizer, prompts, seed=0):
    """Rows as an RL step has them: G=2 rows per prompt, problem-major, completions of ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = [p for p in prompts for _ in range(2)]
    comps = [torch.randint(100, 5000, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
             for _ in rows]
    comps[1].append(tokenizer.eos_token_id)
    return rollout.collate(rows, comps, tokenizer.pad_token_id, "cpu")


def scoring_run(model, batch, **share):
    """(logp, entropy, LoRA grads, decoder input shapes) of one training-side sequence_logprobs call."""
    model.zero_grad(set_to_none=True)
    sizes, spy = batch_sizes_spy(model)
    logp, ent = rollout.sequence_logprobs(model, batch, chunk_size=3, with_entropy=True, **share)
    spy.remove()
    (logp * batch.completion_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return logp.detach(), ent, grads, [tuple(s) for s in sizes]


def test_training_logprobs_and_gradients_equal_with_and_without_sharing(any_model, tokenizer):
    model = add_lora(any_model).train()  # the training pass runs in train mode (lora_dropout is 0)
    prompts = context_prompts(tokenizer)
    batch = rl_batch(tokenizer, prompts)
    R, P, T = batch.input_ids.shape[0], batch.prompt_width, batch.completion_mask.shape[1]
    shared = scoring_run(model, batch)
    per_prompt = scoring_run(model, batch, share_prefix=False)   # yesterday's path: each prompt once
    single = scoring_run(model, batch, share_prompts=False)      # one plain pass

    plan = rollout.plan_prefixes(prompts)
    A, S = max(map(len, plan.prefixes)), max(map(len, plan.suffixes))
    assert shared[3] == [(len(plan.prefixes), A), (len(prompts), S), (R, T - 1)]
    assert per_prompt[3] == [(len(prompts), P), (R, T - 1)] and single[3] == [(R, P + T)]
    m = batch.completion_mask.bool()
    for other in (per_prompt, single):
        torch.testing.assert_close(shared[0][m], other[0][m], atol=1e-5, rtol=0)
        torch.testing.assert_close(shared[1][m], other[1][m], atol=1e-5, rtol=0)
        assert shared[2].keys() == other[2].keys() and len(shared[2]) == 12
        for name in other[2]:  # gradients flow through both cache expansions back to the prefix pass
            assert_grads_close(shared[2][name], other[2][name], name)


def test_scoring_takes_the_old_paths_when_nothing_is_shared(tiny_model, tokenizer):
    prompts = [rollout.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in PROBLEMS]
    comps = [[5, 6], [7, 8, 9], [10]]
    model = add_lora(tiny_model)
    distinct = rollout.collate(prompts, comps, tokenizer.pad_token_id, "cpu")
    assert scoring_run(model, distinct)[3] == [(3, distinct.prompt_width + 3)]           # one plain pass
    grouped = rollout.collate(prompts + prompts, comps + comps, tokenizer.pad_token_id, "cpu")
    assert scoring_run(model, grouped)[3] == [(3, grouped.prompt_width), (6, 2)]          # each prompt once


def test_base_pass_micro_batches_hold_rows_of_one_context(tiny_model, tokenizer):
    """fst.base_logprobs cuts micro-batches from rows sorted by prompt, so a context's rows under
    different problems share a pass, and its log-probs equal the plain pass row for row."""
    model = add_lora(tiny_model)
    prompts = context_prompts(tokenizer, APART, lone=False)   # 3 contexts x 3 problems
    batch = rl_batch(tokenizer, prompts, seed=1)         # 18 rows, problem-major
    parts = rollout.micro_batches(batch, 6)
    assert sorted(torch.cat(parts).tolist()) == list(range(18))
    context_of = [i % 3 for i in range(9) for _ in range(2)]  # prompts are problem-major: 3 contexts each
    assert sorted(sorted({context_of[r] for r in part.tolist()}) for part in parts) == [[0], [1], [2]]
    sizes, spy = batch_sizes_spy(model)
    base = fst.base_logprobs(model, batch, micro_batch=6, chunk=4)
    spy.remove()
    assert [s[0] for s in sizes[:3]] == [1, 3, 6]          # one prefix row, 3 suffixes, 6 completion rows
    with torch.no_grad(), model.disable_adapter():
        ref = rollout.sequence_logprobs(model, batch, share_prompts=False)
    m = batch.completion_mask.bool()
    torch.testing.assert_close(base[m], ref[m], atol=1e-5, rtol=0)


def test_training_gradients_repeat_bit_for_bit_on_two_threads(tiny_model, tokenizer):
    """Cache rows repeated for the rows that share them (a prefix under two contexts, a prompt's G rows)
    are repeated by index_select, whose backward sums their gradients in a fixed order. With
    transformers' batch_select_indices ([index]: index_put_ with accumulate) two CPU threads summed
    them in a varying order, and a resumed 2-process run with reused fast-round rollouts did not
    replay the uninterrupted one (issue 20). The rows: one problem under MIXED's three contexts, the
    last context's rows six times (a micro-batch of a step that trained reused groups)."""
    model = add_lora(tiny_model).train()
    prompts = context_prompts(tokenizer)
    g = torch.Generator().manual_seed(0)
    rows = [prompts[i] for i in (0, 1, 2, 2, 2, 2, 2, 2)]
    comps = [torch.randint(100, 5000, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in rows]
    batch = rollout.collate(rows, comps, tokenizer.pad_token_id, "cpu")
    torch.set_num_threads(2)  # the module's fixture restores one thread
    runs = [scoring_run(model, batch)[2] for _ in range(8)]
    for grads in runs[1:]:
        assert all(torch.equal(grads[name], runs[0][name]) for name in grads)
