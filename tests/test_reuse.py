"""fast.reuse and the behaviour policy: old_logp is the sampler's, stale rows are corrected (CISPO's
truncation at tau), a fast round's rollouts become groups with group_advantages' numbers, they train
once and never past reuse_max_age, and a run that reuses them resumes exactly (tests/test_fst.py)."""
import random

import pytest
import torch

import context_opt as co
import fst
import rollout
from plumbing import config, guards
from pool import Context, PromptPool


def _kept(problem_id: str, reward: float, prompt_id: int = 0, due: int = 3, sampled_at: int = 3) -> fst.KeptRollout:
    return fst.KeptRollout(problem={"id": problem_id, "question": f"q{problem_id}"}, prompt_id=prompt_id,
                           prompt_ids=[5, 6, 7], completion_ids=[8, 9], logprobs=[-0.5, -1.5],
                           finish_reason="eos", text="t", reward=reward, feedback="f", sampled_at=sampled_at, due=due)


def _experience(rewards: list[list[float]]) -> fst.Experience:
    """A step's experience of len(rewards) problems x G rollouts, made by experience_from as the loop makes it."""
    G = len(rewards[0])
    n = len(rewards) * G
    ro = rollout.Rollouts(prompt_index=list(range(n)), prompt_ids=[[1, 2]] * n, completion_ids=[[3, 4, 5]] * n,
                          logprobs=[[-1.0, -2.0, -3.0]] * n, finish_reasons=["eos"] * n, texts=["x"] * n)
    scored = [(r, "") for group in rewards for r in group]
    return fst.experience_from([{"id": str(i)} for i in range(len(rewards))], [g for g in range(len(rewards))
                               for _ in range(G)], [0] * n, ro, scored, scale_by_std=True, pad_id=0, device="cpu")


def test_stale_rows_have_ratios_not_one_and_cispo_truncates_at_tau():
    """Hand-made log-probs: the tokens were sampled by a policy that gave them log-prob `old`; the current
    one gives `logp`. CISPO's gradient on log pi is -min(rho, tau) * A * w: rho = e^2 is cut to tau = 4."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-3.0, -2.5], [-0.5, -3.0]])        # rho = e^2, e^0.5 | 1, 1
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    w = fst.token_weights("cispo", mask, torch.tensor([0, 0]), 2)
    tc = fst.TrainConfig(loss="cispo", cispo_tau=4.0, kl_coef=0.0)
    fst.policy_loss(tc, logp, old, adv, mask, w).backward()
    rho = torch.exp(logp.detach() - old)
    assert rho[0, 0] > 4 and rho[0, 1] != 1                # stale rows: ratios differ from 1
    expected = -torch.clamp(rho, max=4.0) * adv[:, None] * w
    assert torch.allclose(logp.grad, expected) and logp.grad[0, 0].item() == pytest.approx(-4.0 * w[0, 0].item())


def test_update_trains_against_the_samplers_logprobs(tiny_model, tokenizer):
    """update() reads old_logp from the rollouts: on a fresh batch the ratio is 1 up to rounding (the sampler
    and the training forward agree), and a second update on the same rows, after an optimiser step, sees
    ratios away from 1."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    chats = [rollout.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in ("2+2?", "Name a colour.")]
    ro = rollout.sample(model, tokenizer, chats, [2, 2], max_new_tokens=6, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    exp = fst.experience_from([{"id": "a"}, {"id": "b"}], [0, 0, 1, 1], [0] * 4, ro,
                              [(1.0, ""), (0.0, ""), (0.0, ""), (1.0, "")], scale_by_std=True,
                              pad_id=tokenizer.pad_token_id, device="cpu")
    tc = fst.TrainConfig(lr=0.05, warmup_steps=0, micro_batch=4, kl_coef=0.0)
    optimizer, scheduler = fst.make_optimizer(model, tc)
    guard = guards.UpdateGuard(None)
    base = torch.zeros_like(exp.sampler_logp)
    fresh = fst.update(model, optimizer, scheduler, exp, base, tc, 6, guard, step=0)
    assert fresh.rows == 4 and fresh.ratio_dev < 1e-3
    stale = fst.update(model, optimizer, scheduler, exp, base, tc, 6, guard, step=1)
    assert stale.ratio_dev > 10 * max(fresh.ratio_dev, 1e-6)


def test_a_reused_group_has_group_advantages_numbers():
    exp = _experience([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    kept = [_kept("p", 1.0), _kept("q", 0.0), _kept("p", 0.0, prompt_id=-1), _kept("p", 0.0), _kept("q", 0.0)]
    joined = fst.with_reused(exp, kept, scale_by_std=True, pad_id=0, device="cpu")
    assert joined.fresh_rows == 8 and len(joined.group) == 13 and joined.batch.input_ids.shape[0] == 13
    assert joined.group[8:].tolist() == [2, 2, 2, 3, 3]     # one group per problem, whichever context
    adv, keep = fst.group_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(joined.advantage[8:11], adv.view(-1)) and joined.keep.tolist() == [True, False, True, False]
    assert joined.advantage[11:].abs().sum() == 0           # equal rewards: dropped as usual
    assert torch.equal(joined.advantage[:8], exp.advantage) and joined.prompt_id[8:] == [0, -1, 0, 0, 0]  # rows by group: p, p, p, q, q
    assert joined.sampler_logp[8, :2].tolist() == [-0.5, -1.5]  # the fast round's sampler log-probs: old_logp


def test_kept_rollouts_train_once_and_never_past_max_age():
    pool = PromptPool("Seed.")
    scored = [(pool.context(pool[0]), {"id": str(i)},
               co.Scored("t", float(i % 2), "f", co.Sampled([1], [2], [-0.1], "eos"))) for i in range(5)]
    scored.append((Context("A child."), {"id": "0"}, co.Scored("t", 1.0, "f", None)))  # no tokens: not kept
    kept = fst.keep_round_rollouts(scored, pool, step=5, max_age=1)
    assert len(kept) == 5 and {k.sampled_at for k in kept} == {6} and [k.due for k in kept] == [6, 7, 6, 7, 6]
    trained = []
    for step in range(6, 10):
        now, kept = fst.due_rollouts(kept, step, max_age=1)
        trained += [(step, k.problem["id"]) for k in now]
    assert sorted(p for _, p in trained) == ["0", "1", "2", "3", "4"]  # each once
    assert all(step - 6 <= 1 for step, _ in trained)
    late = fst.keep_round_rollouts(scored, pool, step=5, max_age=1)
    assert fst.due_rollouts(late, 8, max_age=1) == ([], [])         # past due: dropped, never trained
    stale = [_kept("p", 1.0, due=9, sampled_at=6)]
    assert fst.due_rollouts(stale, 9, max_age=1)[0] == []            # due, but 3 updates old
    assert [k.due for k in fst.keep_round_rollouts(scored, pool, step=5, max_age=0)] == [6] * 5


def test_the_round_shows_every_scored_rollout_by_phase():
    """on_rollouts sees each evaluate call's pairs under their phase; together they are the round's metric calls."""
    pool = PromptPool("Solve it.")
    anchors = [{"id": str(i), "question": f"What is {i} + {i}?"} for i in range(4)]
    seen = []

    def evaluate(contexts, problems):
        return [("Answer: 1", float(len(c.demos) > 0 and p["id"] != "0"), "") for c, p in zip(contexts, problems)]
    buffer = [({"id": f"d{i}", "question": f"Q{i}?"}, f"Reason.\nAnswer: {i}", 1.0) for i in range(4)]
    cfg = co.FastConfig(operators=["demo"], budget=3.0, minibatch=2, wave=2)
    stats = co.fast_round(pool, anchors, cfg, evaluate=evaluate, reflect=lambda prompts: [], step=0,
                          rng=random.Random(0), demo_buffer=buffer,
                          on_rollouts=lambda phase, c, p, r: seen.append((phase, len(c), len(r))))
    phases = [phase for phase, _, _ in seen]
    assert phases[0] == "pool" and seen[0][1] == 4 and {"children", "parents", "accepted"} <= set(phases)
    assert sum(n for _, n, _ in seen) == stats["metric_calls"] and all(n == m for _, n, m in seen)


def test_reuse_is_a_checked_choice():
    """fast.reuse is one of none|pool|all (rl and gepa accept it and keep nothing: no fast round, or no update)."""
    with pytest.raises(config.ConfigError, match="fast.reuse"):
        fst.load_config("tiny.yaml", ["fast.reuse=some"])
    assert fst.load_config("tiny.yaml", ["mode=rl"]).fast.reuse == "all"
