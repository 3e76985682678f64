"""fast.scoring batch (context_opt's "children tested in RL" section): the paired test's statistic against a
hand computation and its error rates on simulated rewards, the evidence an RL step leaves, a child's
admission and the pool's bound, the rollout plan's trial share, and a round that samples nothing."""
import random

import pytest
import torch

import context_opt as co
import fst
import infra
import rollout
from context_opt import Candidate, PromptPool, StepRollout

SEED = "Solve the problem step by step."


def candidate(pool: PromptPool, parent_id: int = 0, text: str = "Add the numbers.", **kw) -> Candidate:
    child = Candidate(pool.next_id, text, parent_id, born_step=0, operator="reflect", **kw)
    pool.next_id += 1
    pool.candidates.append(child)
    return child


def rows_for(problem_id: str, step: int, rewards_by_prompt: dict[int, list[float]]) -> list[StepRollout]:
    """One group's rollouts: each prompt id's rewards on one problem at one step."""
    problem = {"id": problem_id, "question": f"What is {problem_id}?"}
    return [StepRollout(problem, prompt_id, f"answer {r}", r, "feedback", step)
            for prompt_id, rewards in rewards_by_prompt.items() for r in rewards]


# ---------------------------------------------------------------- the test statistic
def test_paired_z_matches_a_hand_computation():
    # child [1, 0] against parent [0, 0, 1, 0]: N = 6, mean 1/3, population variance 2/9; the child's sum
    # deviates by 1 - 2/3 = 1/3, with permutation variance m n s2 / (N - 1) = 2 * 4 * (2/9) / 5 = 16/45
    one = {"child": [1.0, 0.0], "parent": [0.0, 0.0, 1.0, 0.0]}
    assert co.paired_z([one]) == pytest.approx((1 / 3) / (16 / 45) ** 0.5)
    # strata add deviations and variances; a stratum with no spread or one side missing adds nothing
    flat, lone = {"child": [1.0, 1.0], "parent": [1.0]}, {"child": [1.0], "parent": []}
    assert co.paired_z([one, one, flat, lone]) == pytest.approx((2 / 3) / (32 / 45) ** 0.5)
    assert co.paired_z([flat, lone]) == 0.0
    # the child worse than its parent: the same size, negative
    assert co.paired_z([{"child": [0.0, 1.0], "parent": [1.0, 1.0, 0.0, 1.0]}]) == pytest.approx(-co.paired_z([one]))


def simulate_trial(cfg: co.FastConfig, child_p: float, parent_p: float, rng: random.Random, *, groups: int,
                   child_n: int, parent_n: int, partial: float = 0.0) -> tuple[str, int]:
    """One child's whole trial through record_batch: each step `groups` problems, child_n rollouts of the
    child and parent_n of its parent on each, rewards 1 with the context's probability (problems differ in
    difficulty by up to +-0.15), else `partial`. Returns (verdict, steps it took)."""
    pool = PromptPool(SEED)
    candidate(pool)
    for step in range(cfg.trial_steps + 1):
        rows = []
        for g in range(groups):
            shift = rng.uniform(-0.15, 0.15)
            draw = lambda p: 1.0 if rng.random() < min(1.0, max(0.0, p + shift)) else partial  # noqa: E731
            rows += rows_for(f"s{step}g{g}", step, {0: [draw(parent_p) for _ in range(parent_n)],
                                                    1: [draw(child_p) for _ in range(child_n)]})
        for verdict in co.record_batch(pool, rows, step, cfg):
            return verdict["verdict"], step + 1
    raise AssertionError("a trial must end within trial_steps")


# The shapes a child meets at tiny sizes (B = 2 problems, G = 8, trial_rollouts = 2): one candidate takes
# both groups or two share them; its parent holds 6 of a group's rollouts (pool of one) down to 1 (pool of 4).
SHAPES = [dict(groups=2, child_n=2, parent_n=6), dict(groups=1, child_n=2, parent_n=6),
          dict(groups=1, child_n=2, parent_n=1), dict(groups=2, child_n=2, parent_n=2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{groups}g-{child_n}v{parent_n}".format(**s))
def test_a_child_no_better_than_its_parent_is_accepted_at_most_at_the_promised_rate(shape):
    """accept_alpha bounds the false accepts over the whole trial (every look), at any base rate."""
    cfg, rng, trials = co.FastConfig(scoring="batch"), random.Random(0), 600
    for p, partial in ((0.05, 0.0), (0.2, 0.1), (0.5, 0.0), (0.85, 0.1)):
        accepted = sum(simulate_trial(cfg, p, p, rng, **shape, partial=partial)[0] == "accepted"
                       for _ in range(trials))
        assert accepted / trials <= cfg.accept_alpha, (p, shape, accepted / trials)


def test_a_better_child_is_found_within_its_trial():
    """The stated power (docs of trial_threshold): a child at 0.5 against a parent at 0.2, tested on both
    groups of a tiny step (2 rollouts against 6), is accepted within trial_steps = 6 steps at least 75% of
    the time (83% measured on 2000 trials, in 3.0 steps on average), and a worse one almost never."""
    cfg, rng, trials = co.FastConfig(scoring="batch"), random.Random(1), 500
    better = [simulate_trial(cfg, 0.5, 0.2, rng, **SHAPES[0]) for _ in range(trials)]
    assert sum(v == "accepted" for v, _ in better) / trials >= 0.75
    assert all(steps <= cfg.trial_steps for _, steps in better)
    worse = [simulate_trial(cfg, 0.2, 0.5, rng, **SHAPES[0])[0] for _ in range(trials)]
    assert worse.count("accepted") == 0 and worse.count("failed") / trials >= 0.75


# ---------------------------------------------------------------- the evidence an RL step leaves
def test_a_step_replaces_the_evidence_of_its_problems_pairs_children_and_fades_old_evidence():
    cfg = co.FastConfig(scoring="batch", evidence_fade=0.5)        # 0.5 ** 5 < FADED: gone after 5 steps
    pool = PromptPool(SEED)
    other = pool.add("Think first.", parent_id=0, step=0, operator="reflect")
    other.in_top_k = True
    child = candidate(pool, parent_id=other.id)
    rows = rows_for("q1", 0, {0: [1.0, 0.0, 0.0], other.id: [1.0, 1.0], child.id: [0.0, 1.0]})
    rows += rows_for("q2", 0, {0: [0.0, 0.0, 0.0], other.id: [0.0, 1.0]})  # the child has no rollout here
    assert co.record_batch(pool, rows, 0, cfg) == []
    assert pool[0].scores == {"q1": pytest.approx(1 / 3), "q2": 0.0} and pool[other.id].scores == {"q1": 1.0, "q2": 0.5}
    assert pool.measured_at == {"q1": 0, "q2": 0}
    assert child.strata == [{"problem": "q1", "step": 0, "child": [0.0, 1.0], "parent": [1.0, 1.0]}] and child.steps == 1
    # q1 again at step 3, answered by the seed alone: the other prompt's old evidence on it is gone
    co.record_batch(pool, rows_for("q1", 3, {0: [1.0, 1.0]}), 3, cfg)
    assert pool[0].scores["q1"] == 1.0 and "q1" not in pool[other.id].scores and pool.measured_at["q1"] == 3
    assert child.steps == 1                                         # not sampled at step 3: no look
    co.record_batch(pool, [], 5, cfg)                               # q2 (step 0) weighs 0.5 ** 5: dropped
    assert "q2" not in pool.measured_at and all("q2" not in p.scores for p in pool)
    assert co.evidence_weights(pool, 5, cfg.evidence_fade) == {"q1": 0.25}


def test_an_accepted_child_joins_the_active_pool_which_keeps_k_and_orphans_leave():
    cfg = co.FastConfig(scoring="batch", pool_size=2)
    pool = PromptPool(SEED)
    weak = pool.add("Guess.", parent_id=0, step=0, operator="reflect", scores={"q0": 0.0})
    weak.in_top_k = True
    pool[0].scores = {"q0": 1.0}
    pool.measured_at = {"q0": 0}
    winner = candidate(pool, parent_id=0, text="Add carefully.")
    orphan = candidate(pool, parent_id=weak.id, text="Guess well.")
    strata = [{"problem": f"p{i}", "step": 1, "child": [1.0, 1.0], "parent": [0.0] * 6} for i in range(3)]
    winner.strata, winner.steps = strata, 1
    pool.measured_at |= {f"p{i}": 1 for i in range(3)}
    verdicts = co.judge_candidates(pool, 1, cfg)
    assert [(v["id"], v["verdict"]) for v in verdicts] == [(winner.id, "accepted"), (orphan.id, "orphaned")]
    assert {p.id for p in pool} == {0, winner.id} and all(p.in_top_k for p in pool)   # weak, lowest-ranked, left
    assert pool[winner.id].scores == {f"p{i}": 1.0 for i in range(3)} and pool.candidates == []
    assert co.PromptPool.from_json(pool.to_json()).measured_at == pool.measured_at


def test_a_child_that_runs_out_of_steps_leaves_and_a_pool_without_children_saves_as_before():
    cfg = co.FastConfig(scoring="batch", trial_steps=2)
    pool = PromptPool(SEED)
    before = pool.to_json()
    assert set(before) == {"next_id", "demo_format", "prompts"}           # rounds: the pool file of old
    child = candidate(pool)
    for step in range(2):
        verdicts = co.record_batch(pool, rows_for(f"q{step}", step, {0: [1.0, 0.0], child.id: [0.0, 1.0]}), step, cfg)
    assert [v["verdict"] for v in verdicts] == ["expired"] and pool.candidates == []
    again = co.PromptPool.from_json(pool.to_json())
    assert again.measured_at == {"q0": 0, "q1": 1} and again.candidates == []


# ---------------------------------------------------------------- the plan and the round
class Task:
    def messages(self, problem, system_prompt=None):
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem["question"]}]

    def example_questions(self):
        return []


def test_the_plan_gives_each_group_one_child_under_test_its_share(monkeypatch):
    monkeypatch.setattr("rollout.encode_chat", lambda tok, messages: [len(messages[0]["content"])])
    pool = PromptPool(SEED)
    pool.add("Think first.", parent_id=0, step=0, operator="reflect").in_top_k = True
    problems = [{"id": f"q{i}", "question": f"What is {i}?"} for i in range(4)]
    plain = co.plan_rollouts(None, Task(), problems, pool, group_size=8, seed=0, step=3, trial_rollouts=2)
    assert plain == co.plan_rollouts(None, Task(), problems, pool, group_size=8, seed=0, step=3)  # no child: as rounds
    children = [candidate(pool, text="Add."), candidate(pool, text="Add well.")]
    plan = co.plan_rollouts(None, Task(), problems, pool, group_size=8, seed=0, step=3, trial_rollouts=2)
    for g in range(4):
        ids = [i for i, group in zip(plan.prompt_id, plan.group) if group == g]
        child = children[(g + 3) % 2].id                          # groups take turns, shifted by the step
        assert len(ids) == 8 and ids.count(child) == 2 and {0, 1} <= set(ids)
        assert not set(ids) - {0, 1, child}


def test_a_batch_round_writes_children_from_rl_rollouts_and_samples_nothing():
    cfg = co.FastConfig(scoring="batch", candidates=2, operators=["reflect"])
    pool = PromptPool(SEED)
    traces = rows_for("q1", 4, {0: [0.0, 1.0]}) + rows_for("q2", 5, {0: [0.0, 0.0]})
    co.record_batch(pool, [t for t in traces if t.step == 4], 4, cfg)
    co.record_batch(pool, [t for t in traces if t.step == 5], 5, cfg)
    shown, replies = [], iter(["```\nAdd the two numbers, then check.\n```", "```\nCount on from the larger.\n```"])

    def reflect(chats):
        shown.extend(chats)
        return [co.Reflection(next(replies), tokens=7) for _ in chats]
    verdicts = [{"id": 9, "operator": "reflect", "verdict": "accepted", "z": 3.0, "step": 5},
                {"id": 8, "operator": "reflect", "verdict": "expired", "z": 0.1, "step": 4}]
    stats = co.batch_round(pool, traces, cfg, reflect=reflect, step=5, rng=random.Random(0), verdicts=verdicts)
    assert [c.text for c in pool.candidates] == ["Add the two numbers, then check.", "Count on from the larger."]
    assert {c.parent_id for c in pool.candidates} == {0} and len(pool) == 1       # under test, not in the pool
    assert stats["metric_calls"] == 0 and stats["reflector_tokens"] == 14 and stats["under_test"] == [1, 2]
    assert stats["accepted"] == 1 and stats["rejected"]["not_better"] == 1 and stats["verdicts"] == verdicts
    # the reflector read the parent's RL rollouts (its failures), with their feedback
    assert "What is q2?" in shown[0][-1]["content"] and "feedback" in shown[0][-1]["content"]
    # children already under test fill the slots: the next round proposes nothing
    assert co.batch_round(pool, traces, cfg, reflect=lambda chats: pytest.fail("no slot"), step=11,
                          rng=random.Random(0))["proposals"] == 0


def test_trial_rows_kept_out_of_the_loss_leave_the_pool_rows_with_their_own_advantages():
    """fast.train_on_trials false: a child's rows (prompt 7) are dropped after they served as evidence; each
    problem's advantages are recomputed over its pool rows alone (rewards 1, 0 -> +-0.707 with std scaling)."""
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]          # problem 0: rows 0-3; problem 1: rows 4-7
    prompt_id = [0, 0, 7, 7, 0, 7, 0, 7]
    ro = rollout.Rollouts(prompt_index=list(range(8)), prompt_ids=[[1, 2, r] for r in range(8)],
                          completion_ids=[[3] * (r + 1) for r in range(8)],
                          logprobs=[[-0.5] * (r + 1) for r in range(8)],
                          finish_reasons=["eos"] * 8, texts=[f"t{r}" for r in range(8)], decode_tokens=36)
    exp = fst.experience_from([{"id": "a"}, {"id": "b"}], [0, 0, 0, 0, 1, 1, 1, 1], prompt_id, ro,
                              [(r, f"f{i}") for i, r in enumerate(rewards)], scale_by_std=True, pad_id=0, device="cpu")
    assert exp.advantage[2] != 0                                  # with the child's rows, they train too
    pool_only = fst.without_trial_rows(exp, {7}, scale_by_std=True, pad_id=0, device="cpu")
    assert pool_only.rollouts.texts == ["t0", "t1", "t4", "t6"] and pool_only.prompt_id == [0, 0, 0, 0]
    assert pool_only.group.tolist() == [0, 0, 1, 1] and pool_only.rollouts.decode_tokens == 36
    assert [s for s, _ in pool_only.scored] == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(pool_only.advantage, pool_only.advantage.new_tensor([0.7071, -0.7071, 0.0, 0.0]), atol=1e-3)
    assert pool_only.keep.tolist() == [True, False]               # problem b's pool rows all failed: no signal
    assert pool_only.batch.completion_mask.sum(1).tolist() == [1, 2, 5, 7]
    assert pool_only.sampler_logp[3, :7].tolist() == [-0.5] * 7


def test_batch_scoring_needs_a_rollout_of_every_active_context_beside_the_child():
    with pytest.raises(infra.ConfigError, match="fast.trial_rollouts"):
        fst.load_config(None, ["fast.scoring=batch", "sampling.group_size=4", "fast.pool_size=4"])
    assert fst.load_config(None, ["fast.scoring=batch", "sampling.group_size=6"]).fast.trial_rollouts == 2
