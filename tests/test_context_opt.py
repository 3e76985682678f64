"""Tests for context_opt.py: Pareto bookkeeping, guards, acceptance, budget and operators, all with plain
Python callables in place of the model (scripted reflectors, deterministic scorers)."""
import hashlib
import json
import math
import random
import types
import zlib
from collections import Counter
from contextlib import contextmanager

import pytest

import context_opt as co
import rewards
from conftest import GSM8K_TEST
from context_opt import fast_round
from plumbing import config
from pool import Context, Prompt, PromptPool, as_context, dominates

SEED = "Solve the problem step by step."


def pool_from(matrix: dict[str, dict[str, float]]) -> tuple[PromptPool, dict[str, int]]:
    """A pool whose prompt named X has the given per-problem scores; returns name -> id."""
    pool = PromptPool()
    ids = {name: pool.add(name, parent_id=None, step=0, operator="seed", scores=scores).id
           for name, scores in matrix.items()}
    return pool, ids


def problems(n: int) -> list[dict]:
    return [{"id": f"p{i:02d}", "question": f"Tom has {i} red apples and buys {i + 3} more. "
             f"How many apples does Tom have now, problem number {i:02d}?", "answer": str(2 * i + 3)}
            for i in range(n)]


def scorer(reward_fn, log: list | None = None):
    """evaluate() from reward_fn(context_text, problem) -> reward; logs every (context text, problem) pair
    (a context's text: its instruction, then its demos as "Example: ..." blocks)."""
    def evaluate(contexts, probs):
        assert len(contexts) == len(probs)
        texts = [as_context(c).text() for c in contexts]
        if log is not None:
            log.extend(zip(texts, probs))
        return [(f"output of {p['id']}", reward_fn(t, p), f"feedback on {p['id']}") for t, p in zip(texts, probs)]
    return evaluate


def fenced(text: str) -> str:
    return f"Let me think about what failed.\n```text\n{text}\n```\n"


def settings(n_anchors: int, budget: int, **fields) -> co.FastConfig:
    """The round's FastConfig with a budget of exactly `budget` metric calls on n_anchors anchors
    (fast_round spends int(cfg.budget * n_anchors))."""
    per_anchor = budget / n_anchors
    if int(per_anchor * n_anchors) < budget:                    # the float product fell just short
        per_anchor = math.nextafter(per_anchor, math.inf)
    assert int(per_anchor * n_anchors) == budget
    return co.FastConfig(budget=per_anchor, **fields)


def each(reply):
    """A batched reflect() from a one-prompt function: fast_round hands over a wave's prompts at once."""
    return lambda prompts: [reply(p) for p in prompts]


# ---------------------------------------------------------------- Pareto bookkeeping
MATRIX = {"A": {"q1": 1.0, "q2": 0.0, "q3": 0.5},
          "B": {"q1": 1.0, "q2": 1.0, "q3": 0.0},
          "C": {"q1": 0.0, "q2": 0.0, "q3": 0.5},    # dominated by A, yet tied on A's front for q3
          "D": {"q1": 1.0, "q2": 0.0, "q3": 0.5}}    # identical to A: neither dominates the other


def test_pareto_front_keeps_all_ties():
    pool, i = pool_from(MATRIX)
    assert pool.pareto_front(["q1", "q2", "q3"]) == {
        "q1": {i["A"], i["B"], i["D"]}, "q2": {i["B"]}, "q3": {i["A"], i["C"], i["D"]}}


def test_nondominated_drops_dominated_but_keeps_equal_prompts():
    pool, i = pool_from(MATRIX)
    assert {p.id for p in pool.nondominated()} == {i["A"], i["B"], i["D"]}
    assert dominates(pool[i["A"]], pool[i["C"]], ["q1", "q2", "q3"])
    assert not dominates(pool[i["A"]], pool[i["D"]], ["q1", "q2", "q3"])
    assert pool.coverage() == {i["A"]: 2, i["B"]: 2, i["D"]: 2}


def test_parent_sampling_follows_front_coverage():
    pool, i = pool_from({"A": {"q1": 1, "q2": 1, "q3": 1, "q4": 0},
                         "B": {"q1": 0, "q2": 0, "q3": 0, "q4": 1},
                         "C": {"q1": 0, "q2": 0, "q3": 1, "q4": 0},     # dominated by A: never drawn
                         "E": {"q1": 0.5, "q2": 0.5, "q3": 0.5, "q4": 0.5}})   # on no front: never drawn
    rng, n = random.Random(0), 8000
    counts = Counter(pool.sample_parent(rng).id for _ in range(n))
    assert counts[i["C"]] == 0 and counts[i["E"]] == 0
    assert abs(counts[i["A"]] / n - 0.75) < 0.02 and abs(counts[i["B"]] / n - 0.25) < 0.02


def test_top_k_ranks_by_coverage_then_mean_and_marks_active():
    pool, i = pool_from({"A": {"q1": 1, "q2": 0, "q3": 0}, "B": {"q1": 0, "q2": 1, "q3": 1},
                         "C": {"q1": 0.9, "q2": 0.9, "q3": 0}, "D": {"q1": 0, "q2": 0, "q3": 0.9}})
    # Fronts: q1 {A}, q2 {B}, q3 {B}; D is dominated by B; C is non-dominated but on no front.
    assert [p.id for p in pool.top_k(2)] == [i["B"], i["A"]]
    assert [p.in_top_k for p in pool] == [True, True, False, False]
    assert [p.text for p in pool if p.in_top_k] == ["A", "B"]
    assert pool.best().id == i["B"]
    fresh = PromptPool(SEED)
    assert [p.text for p in fresh if p.in_top_k] == [SEED] and fresh.sample_parent(random.Random(0)).text == SEED


def test_pool_json_round_trip(tmp_path):
    pool = PromptPool(SEED)
    pool[0].scores = {"p00": 1.0, "p01": 0.25}
    pool.add("child", parent_id=0, step=6, operator="reflect", scores={"p00": 0.5, "p01": 1 / 3})
    pool.add("demo child", parent_id=1, step=12, operator="demo", scores={"p00": 0.0, "p01": 1.0})
    pool.retain({0, 2})
    pool.top_k(4)
    again = PromptPool.from_json(json.loads(json.dumps(pool.to_json())))
    assert list(again) == list(pool) and again.next_id == pool.next_id == 3
    pool.save(tmp_path / "pool.json")
    loaded = PromptPool.load(tmp_path / "pool.json")
    assert list(loaded) == list(pool)
    assert loaded[2] == Prompt(2, "demo child", 1, 12, "demo", {"p00": 0.0, "p01": 1.0}, True)
    assert loaded.add("next", parent_id=2, step=18, operator="reflect").id == 3


# ---------------------------------------------------------------- guards
ANCHOR_Q = problems(3)[1]["question"]


@pytest.mark.parametrize("raw, reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("```\n   \n```", "empty"),
    ("Be careful and check units.", "no_fence"),
    ("```\nBe careful and check units.", "no_fence"),                 # opened, never closed
    (fenced("x" * 501), "too_long"),
    (fenced("Check units.\n</think>\nBe careful."), "thinking"),
    (fenced("<thinking>hmm</thinking> Be careful."), "thinking"),
    (fenced("  Solve the problem\n step by   step. "), "same_as_parent"),
    (fenced(f"Solve step by step. For instance: {ANCHOR_Q} Answer 5."), "copies_anchor"),
])
def test_guards_reject_malformed_proposals(raw, reason):
    assert co.vet_reflection(raw, SEED, [ANCHOR_Q], max_chars=500) == (None, reason)


def test_guards_let_a_good_proposal_through():
    good = "Solve the problem step by step.\nAdd quantities bought to those owned; end with 'Answer: N'."
    assert co.vet_reflection(fenced(good), SEED, [ANCHOR_Q], max_chars=500) == (good, None)
    # A copy already in the parent (e.g. an old demo whose problem recurs) is not the child's doing.
    parent = f"{SEED}\nExample:\nProblem: {ANCHOR_Q}"
    assert co.check_proposal(parent + "\nCheck units.", parent, [ANCHOR_Q], 5000) is None


# The README's tiny run accepted this reflection: a training question pasted into the instruction.
PASTED_REPLY = fenced("Answer the question.\nWhat is 24 + 7?")


def test_an_instruction_carrying_a_question_the_round_has_seen_is_rejected():
    seen = ["Which number is smaller, 83 or 38?", "What is 24 + 7?"]
    assert co.vet_reflection(PASTED_REPLY, SEED, [ANCHOR_Q], 500, seen) == (None, "copies_question")
    assert co.vet_reflection(PASTED_REPLY, SEED, [ANCHOR_Q], 500) == ("Answer the question.\nWhat is 24 + 7?", None)
    # the task's own worked example counts too
    add = rewards.get_task("add")
    example = fenced(f"Answer the question. For instance: {add.example_questions()[0]}")
    assert co.vet_reflection(example, SEED, [], 500, add.example_questions()) == (None, "copies_question")
    assert rewards.get_task("gsm8k").example_questions() == []


@pytest.mark.parametrize("where", ["demo_buffer", "task_questions"])
def test_fast_round_rejects_a_reflection_pasting_a_demo_buffer_or_task_example_question(where):
    seen = {"id": "old", "question": "What is 24 + 7?", "answer": "31"}
    known = {"demo_buffer": [(seen, "24 + 7 = 31.\nAnswer: 31", 1.0)]} if where == "demo_buffer" else \
        {"task_questions": [seen["question"]]}
    stats = fast_round(PromptPool(SEED), problems(4), settings(4, 40, patience=3, wave=1), evaluate=scorer(magic),
                       reflect=each(lambda _: PASTED_REPLY), step=6, rng=random.Random(0), **known)
    assert stats["accepted"] == 0 and stats["rejected"]["copies_question"] == 3


def test_extract_prompt_takes_the_last_closed_block():
    assert co.extract_prompt("```\ndraft\n```\nbetter:\n```markdown\nfinal\n```") == "final"
    assert co.extract_prompt("````\nouter\n```python\nx = 1\n```\n````") == "outer\n```python\nx = 1\n```"
    assert co.extract_prompt("```\nfinal\n```\n```\ntruncated") == "final"


def test_reflection_prompt_shows_everything_the_reflector_needs():
    chat = co.build_reflection_prompt("PARENT PROMPT", [
        {"question": "Q1 text", "output": "full output 1", "reward": 0.0, "feedback": "expected 18, got 16"}])
    request = chat[-1]["content"]                   # after the worked reflection turn
    for part in ("PARENT PROMPT", "Q1 text", "full output 1", "0.00", "expected 18, got 16",
                 "keep what still helps", "instruction only", "ONE fenced block"):
        assert part in request


# ---------------------------------------------------------------- fast rounds
def magic(text, problem):
    return 1.0 if "MAGIC" in text else 0.0


def test_round_with_a_better_proposal_improves_the_pool_and_links_parent():
    anchors, asked = problems(10), []
    failing = {"p03", "p05", "p07"}    # the seed fails only these; the child fixes them

    def reward(text, problem):
        return 1.0 if "MAGIC" in text or problem["id"] not in failing else 0.0

    def reflect(prompt):
        asked.append(prompt)
        return fenced(SEED + "\nMAGIC: add what is bought to what is owned.")

    pool = PromptPool(SEED)
    stats = fast_round(pool, anchors, settings(10, 50, wave=1), evaluate=scorer(reward), reflect=each(reflect),
                       step=6, rng=random.Random(0))
    assert stats["accepted"] == 1 and stats["accepted_by_operator"] == {"reflect": 1}
    assert stats["best_score_before"] == 0.7 and stats["best_score_after"] == 1.0
    child = pool.best()
    assert (child.parent_id, child.born_step, child.operator, child.in_top_k) == (0, 6, "reflect", True)
    assert list(pool) == [child]                     # the seed is dominated now, hence dropped
    assert stats["accepted_prompts"] == [child.text] and [p.text for p in pool if p.in_top_k] == [child.text]
    # The minibatch is exactly the parent's three failures, with outputs and feedback shown.
    request = asked[0][-1]["content"]
    for p in anchors:
        assert (p["question"] in request) == (p["id"] in failing)
    assert "feedback on p03" in request and "output of p05" in request


@pytest.mark.parametrize("rescore_parent, proposals", [(False, 10), (True, 5)])
def test_acceptance_is_strict_a_tie_is_rejected(rescore_parent, proposals):
    half = lambda text, problem: 0.5 if "half" in text else 0.0  # noqa: E731
    pool = PromptPool("Think half as hard.")
    stats = fast_round(pool, problems(6), settings(6, 30, wave=1, rescore_parent=rescore_parent),
                       evaluate=scorer(half), reflect=each(lambda _: fenced("Try half the work.")), step=6,
                       rng=random.Random(0))
    assert stats["accepted"] == 0 and stats["rejected"]["not_better"] == stats["proposals"] == proposals
    assert [p.text for p in pool] == ["Think half as hard."]
    # scoring the pool, then 30 calls of budget: 3 per child, and 3 more for its parent when re-scored
    assert stats["metric_calls"] == 6 + 30


@pytest.mark.parametrize("wave", [1, 4])
def test_garbage_reflector_leaves_pool_unchanged_and_counts_reasons(wave):
    garbage = ["", "no fence at all", fenced("y" * 9000), fenced("<think>unfinished"), fenced(SEED),
               fenced(problems(4)[2]["question"] + " is the kind of problem.")]
    replies = iter(garbage * 10)
    pool = PromptPool(SEED)
    before = PromptPool.from_json(pool.to_json())
    stats = fast_round(pool, problems(4), settings(4, 100, max_prompt_chars=2000, patience=12, wave=wave),
                       evaluate=scorer(magic), reflect=each(lambda _: next(replies)), step=6, rng=random.Random(0))
    assert [p.text for p in pool] == [p.text for p in before] and stats["accepted"] == 0
    assert stats["proposals"] == 12 and stats["metric_calls"] == 4        # patience ends the round
    assert stats["waves"] == 12 // wave
    assert stats["rejected"] == {"empty": 2, "no_fence": 2, "too_long": 2, "thinking": 2, "same_as_parent": 2,
                                 "duplicate": 0, "copies_anchor": 2, "copies_question": 0, "copies_example": 0,
                                 "not_better": 0}
    assert stats["rejected_by_operator"] == {"reflect": stats["rejected"]}


def test_round_with_a_perfect_pool_stops_without_spending():
    pool = PromptPool("MAGIC prompt")
    stats = fast_round(pool, problems(5), settings(5, 1000), evaluate=scorer(magic), reflect=pytest.fail, step=6,
                       rng=random.Random(0))
    assert stats["skipped"]["perfect_parent"] == 10 and stats["proposals"] == 0
    assert stats["metric_calls"] == 5


@pytest.mark.parametrize("wave, rescore_parent", [(1, False), (1, True), (4, True)])
@pytest.mark.parametrize("budget", [20, 37, 64, 120])
def test_budget_is_respected(budget, wave, rescore_parent):
    anchors, log, counter = problems(12), [], iter(range(10 ** 6))

    def noisy(text, problem):                       # deterministic but prompt-dependent coin flips
        return float(zlib.crc32(f"{text}|{problem['id']}".encode()) % 3 == 0)

    pool = PromptPool(SEED)
    stats = fast_round(pool, anchors, settings(12, budget, wave=wave, rescore_parent=rescore_parent),
                       evaluate=scorer(noisy, log), step=6,
                       reflect=each(lambda _: fenced(f"{SEED} variant {next(counter)}")), rng=random.Random(1))
    assert stats["metric_calls"] == len(log)
    scoring, most = len(anchors), 3 * (2 if rescore_parent else 1)       # one live prompt, scored first
    assert stats["metric_calls"] <= scoring + budget + wave * len(anchors)   # documented overshoot
    assert stats["metric_calls"] > scoring + budget - most                 # and it did spend it
    assert stats["proposals"] == stats["accepted"] + stats["rejected"]["not_better"]
    assert all(len(p.scores) == len(anchors) for p in pool) and 1 <= sum(p.in_top_k for p in pool) <= 4


@pytest.mark.parametrize("wave", [1, 3, 4])
@pytest.mark.parametrize("cap", [1, 5, 7])
def test_max_proposals_ends_the_round_at_exactly_that_many(wave, cap):
    """The benchmark compares wave sizes at equal proposals: the cap must bind mid-wave too, and it
    must count proposals (guard rejections included), not draws or accepted children."""
    counter = iter(range(10 ** 6))

    def noisy(text, problem):                       # deterministic, prompt-dependent: no prompt is perfect
        return float(zlib.crc32(f"{text}|{problem['id']}".encode()) % 3 == 0)

    def reply(_):                                   # every third reply fails the guards: still a proposal
        n = next(counter)
        return fenced(f"{SEED} variant {n}") if n % 3 else "no fence"

    stats = fast_round(PromptPool(SEED), problems(12),
                       settings(12, 10 ** 4, wave=wave, patience=100, max_proposals=cap),
                       evaluate=scorer(noisy), reflect=each(reply), step=6, rng=random.Random(0))
    assert stats["proposals"] == cap
    assert stats["rejected"]["no_fence"] == len(range(0, cap, 3))
    assert stats["waves"] == math.ceil(cap / wave)
    uncapped = fast_round(PromptPool(SEED), problems(12), settings(12, 60, wave=wave, max_proposals=0),
                          evaluate=scorer(lambda t, p: 0.0),
                          reflect=each(lambda _: fenced(f"{SEED} variant {next(counter)}")), step=6,
                          rng=random.Random(0))
    assert uncapped["proposals"] > 7                          # 0 = no cap: the budget ends that round
    with pytest.raises(ValueError, match="max_proposals"):
        fast_round(PromptPool(SEED), problems(4), settings(4, 10, max_proposals=-1), evaluate=scorer(magic),
                   reflect=pytest.fail, step=6, rng=random.Random(0))


def test_demo_operator_uses_only_rewarded_non_anchor_solutions():
    anchors, log = problems(6), []
    past = problems(9)[6:]                          # p06..p08: earlier RL problems, not anchors
    buffer = [(anchors[0], "LEAKED anchor solution", 1.0),   # an anchor problem: never a demo
              (past[0], "wrong solution", 0.0),              # unrewarded: never a demo
              (past[1], "6 + 9 = 15. Answer: 15", 1.0)]

    def reward(text, problem):                      # the demo helps everywhere but p05
        return 1.0 if "Answer: 15" in text and problem["id"] != "p05" else 0.0

    pool = PromptPool(SEED)
    stats = fast_round(pool, anchors, settings(6, 60, operators=["demo"], wave=1), evaluate=scorer(reward, log),
                       reflect=pytest.fail, step=12, rng=random.Random(0), demo_buffer=buffer)
    child = pool.best()
    assert stats["accepted_by_operator"] == {"demo": 1} and child.operator == "demo" and child.parent_id == 0
    assert child.text == SEED and child.demos == [[past[1]["question"], "6 + 9 = 15. Answer: 15"]]
    assert not any("LEAKED" in text or "wrong solution" in text for text, _ in log)
    assert stats["skipped"]["no_demo"] >= 1         # the one good demo is in the child already


def test_operators_cycle_and_are_counted():
    pool = PromptPool(SEED)
    buffer = [(problems(9)[8], "a worked solution", 1.0)]
    stats = fast_round(pool, problems(6), settings(6, 40, operators=["reflect", "demo"]), evaluate=scorer(magic),
                       reflect=each(lambda _: fenced("Plain prompt.")), step=6, rng=random.Random(0),
                       demo_buffer=buffer)
    assert stats["proposals_by_operator"]["reflect"] >= 1 and stats["proposals_by_operator"]["demo"] >= 1
    with pytest.raises(ValueError, match=r"'fast.operators\[0\]' must be one of .*got 'crossover'"):
        fast_round(pool, problems(6), settings(6, 40, operators=["crossover"]), evaluate=scorer(magic),
                   reflect=str, step=6, rng=random.Random(0))


@pytest.fixture()
def registry(monkeypatch):
    """co.operator registers into a copy of the registry, dropped after the test."""
    monkeypatch.setattr(co, "OPERATORS", dict(co.OPERATORS))
    return co.operator


def test_a_registered_operator_is_all_a_new_operator_takes(registry):
    @registry("magic", skip="already_magic")
    def add_magic(r, parent, batch):                # a ready-made child: guards, scoring, no reflector
        if "MAGIC" in parent.text:
            return None
        return co.Proposal(parent=parent, batch=batch, text=parent.text + " MAGIC")

    pool = PromptPool(SEED)
    stats = fast_round(pool, problems(6), settings(6, 40, operators=["magic"], wave=1), evaluate=scorer(magic),
                       reflect=pytest.fail, step=6, rng=random.Random(0))
    assert stats["accepted_by_operator"] == {"magic": 1} and pool.best().operator == "magic"
    assert stats["skipped"] == {"perfect_parent": stats["skipped"]["perfect_parent"], "already_magic": 0}
    co.FastConfig(operators=["reflect", "magic"]).check("fast.")


def test_an_operator_proposal_without_text_or_reflection_prompt_cannot_reach_scoring(registry):
    registry("empty_handed")(lambda r, parent, batch: co.Proposal(parent=parent, batch=batch))
    scored = []
    with pytest.raises(ValueError, match="'empty_handed' returned a proposal with neither text nor"):
        fast_round(PromptPool(SEED), problems(4), settings(4, 40, operators=["empty_handed"]),
                   evaluate=scorer(magic, scored), reflect=pytest.fail, step=6, rng=random.Random(0))
    assert len(scored) == 4                         # the live pool's scoring only: no child was scored


def test_config_check_names_an_unknown_operator():
    co.FastConfig(operators=["reflect", "demo"]).check("fast.")
    with pytest.raises(config.ConfigError) as error:
        co.FastConfig(operators=["reflect", "crossover"]).check("fast.")
    assert str(error.value) == ("config key 'fast.operators[1]' must be one of "
                                f"{list(co.OPERATORS)}, got 'crossover'")   # ['reflect', 'demo', ...]


def sequential_scenario(**wave_settings) -> tuple[list[dict], dict]:
    """Two rounds with both operators, guard rejections, ties and acceptances, all scripted."""
    anchors, past = problems(10), problems(14)[10:]
    buffer = [(past[0], "4 + 7 = 11. Answer: 11", 1.0), (past[1], "Answer: 13", 1.0), (past[2], "no", 0.0)]

    def reward(text, problem):
        return float(zlib.crc32(f"{text}|{problem['id']}".encode()) % 5 < 2)

    counter = iter(range(10 ** 6))

    def reply(_):
        k = next(counter)
        if k % 4 == 0:
            return fenced(f"{SEED} Hint {k}.")
        return ["no fence here", fenced(SEED), fenced(f"{SEED} Rule {k}: carry the tens.")][k % 4 % 3]

    pool, rounds = PromptPool(SEED), []
    for step, budget in ((5, 60), (11, 45)):
        stats = fast_round(pool, anchors, settings(10, budget, operators=["reflect", "demo"], **wave_settings),
                           evaluate=scorer(reward), reflect=each(reply), step=step, rng=random.Random(step),
                           demo_buffer=buffer)
        rounds.append(stats)
    return rounds, pool.to_json()


# What the sequential loop (one proposal at a time, parent judged on its anchor rollouts) returns for
# sequential_scenario: a readable summary, then a digest of its every field. Recorded before waves existed;
# regenerated once when contexts got worked examples as a list, duplicates a guard, and accepted children a
# fresh score on every anchor (issue 18): demo children now keep the instruction and add to the demos.
SEQUENTIAL_ROUNDS = [(10, 5, 78, {"no_fence": 1, "same_as_parent": 1, "duplicate": 2, "not_better": 1}, [3, 4, 5]),
                     (7, 4, 82, {"no_fence": 1, "duplicate": 2}, [3, 6, 8, 4])]
SEQUENTIAL_POOL = [(3, 0, "demo", 5), (4, 3, "reflect", 5), (5, 3, "demo", 5), (6, 4, "demo", 11),
                   (7, 5, "reflect", 11), (8, 7, "reflect", 11), (9, 3, "reflect", 11)]
SEQUENTIAL_DIGEST = "bfd0d89b5f6b49e9fbade02adb7b93265d3ff23c6797fafb777483d946fe6df8"
NEW_STATS = {"wave", "waves", "rejected_by_operator", "seconds_reflecting", "seconds_scoring", "seconds_proposing",
             "reflector_tokens", "reflector", "reflector_replies"}
NEW_REASONS = ("copies_question",)


def test_wave_of_one_reproduces_the_sequential_loop():
    rounds, pool = sequential_scenario(wave=1, rescore_parent=False)
    assert [(r["proposals"], r["accepted"], r["metric_calls"], {k: n for k, n in r["rejected"].items() if n},
             r["top_k_ids"]) for r in rounds] == SEQUENTIAL_ROUNDS
    assert [(p["id"], p["parent_id"], p["operator"], p["born_step"]) for p in pool["prompts"]] == SEQUENTIAL_POOL
    old_fields = [{k: v for k, v in r.items() if k not in NEW_STATS and not k.startswith("seconds")} for r in rounds]
    for r in old_fields:  # a reason added since (none of its rejections here) leaves the digest as it was
        assert all(r["rejected"].pop(reason) == 0 for reason in NEW_REASONS)
    digest = hashlib.sha256(json.dumps({"stats": old_fields, "pool": pool}, sort_keys=True).encode()).hexdigest()
    assert digest == SEQUENTIAL_DIGEST


def fair_rate(n: int, p: float) -> float:
    """P(X > Y) for independent X, Y ~ Binomial(n, p): how often a fair strict test accepts an equal child."""
    pmf = [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
    return sum(pmf[x] * pmf[y] for x in range(n + 1) for y in range(x))


@pytest.mark.parametrize("wave", [1, 4])
def test_a_child_no_better_than_its_parent_passes_only_by_fair_chance(wave):
    """Every pair is right with probability 0.3 whatever the prompt, so every child equals its parent.
    A fair test accepts it P(Bin(3, .3) > Bin(3, .3)) ~ 0.33 of the time; judged against the parent's
    failures (its anchor rollouts, which chose the minibatch) it passes 1 - 0.7^3 ~ 0.66 of the time."""
    def rates(rescore_parent: bool) -> float:
        coin, counter = random.Random(1), iter(range(10 ** 6))
        evaluate = lambda texts, probs: [("out", float(coin.random() < 0.3), "fb") for _ in texts]  # noqa: E731
        accepted = judged = 0
        for r in range(90):
            stats = fast_round(PromptPool(SEED), problems(12),
                               settings(12, 60, wave=wave, rescore_parent=rescore_parent), evaluate=evaluate, step=r,
                               reflect=each(lambda _: fenced(f"{SEED} variant {next(counter)}")),
                               rng=random.Random(r))
            accepted += stats["accepted"]
            judged += stats["accepted"] + stats["rejected"]["not_better"]
        assert judged >= 500
        return accepted / judged

    assert abs(rates(rescore_parent=True) - fair_rate(3, 0.3)) < 0.05
    assert rates(rescore_parent=False) > 0.55                 # the biased test, for contrast


def test_a_wave_reflects_and_scores_in_one_call_each():
    anchors, reflect_calls, evaluate_calls = problems(6), [], []

    def evaluate(contexts, probs):
        evaluate_calls.append(list(zip([c.text() for c in contexts], [p["id"] for p in probs])))
        return scorer(magic)(contexts, probs)

    def reflect(prompts):
        reflect_calls.append(len(prompts))
        return [co.Reflection(fenced(f"{SEED} MAGIC {n}"), tokens=7) for n in range(len(prompts))]

    pool = PromptPool(SEED)
    stats = fast_round(pool, anchors, settings(6, 60, wave=4), evaluate=evaluate, reflect=reflect, step=6,
                       rng=random.Random(0))
    assert reflect_calls == [4] and stats["reflector_tokens"] == 28 and stats["waves"] == 1
    anchor_scoring, minibatches, rescored = evaluate_calls      # then every parent is perfect: skips
    assert len(anchor_scoring) == 6 and len(rescored) == 4 * 6  # each accepted child afresh on every anchor
    children = [pair for pair in minibatches if "MAGIC" in pair[0]]
    parent = [pair for pair in minibatches if pair[0] == SEED]
    assert len(children) == 4 * 3 and len(parent) == len(set(parent)) <= 6   # the parent once per problem
    assert {pid for _, pid in children} == {pid for _, pid in parent}         # ...where its children are judged
    assert stats["accepted"] == 4 and stats["metric_calls"] == 6 + len(minibatches) + 24
    assert stats["skipped"]["perfect_parent"] == 10


def test_demo_children_join_the_wave_and_rejections_are_split_by_operator():
    reflect_calls, evaluate_calls = [], []
    # Worked solutions to past problems, every other one too long to fit in a prompt.
    buffer = [(p, f"solution {p['id']} " + "x" * 300 * (n % 2), 1.0) for n, p in enumerate(problems(20)[12:])]

    def evaluate(contexts, probs):
        evaluate_calls.append([c.text() for c in contexts])
        return scorer(lambda text, problem: 0.0)(contexts, probs)

    def reflect(prompts):
        reflect_calls.append(len(prompts))
        return ["no fence"] + [fenced(f"{SEED} Try {n}.") for n in range(1, len(prompts))]

    stats = fast_round(PromptPool(SEED), problems(6),
                       settings(6, 60, wave=4, operators=["reflect", "demo"], max_prompt_chars=300),
                       evaluate=evaluate, reflect=reflect, step=6, rng=random.Random(0), demo_buffer=buffer)
    assert reflect_calls[0] == 2                                  # a wave of 4: two reflections, two demos
    assert any(any("Example:" in t for t in texts) and any("Try" in t for t in texts) for texts in evaluate_calls)
    assert stats["rejected_by_operator"]["demo"]["too_long"] > 0
    assert stats["rejected_by_operator"]["reflect"]["no_fence"] == len(reflect_calls)
    for reason, n in stats["rejected"].items():
        assert n == sum(by_op[reason] for by_op in stats["rejected_by_operator"].values())
    assert stats["seconds_scoring"] > 0 and stats["seconds_reflecting"] > 0 and stats["seconds_proposing"] > 0
    assert stats["seconds"] >= stats["seconds_scoring"] + stats["seconds_reflecting"]


# ---------------------------------------------------------------- model-backed adapters, with fakes
@pytest.fixture()
def fake_stack(monkeypatch):
    """Stand-ins for rollout/rewards that record calls, so the adapters' plumbing is checked model-free."""
    calls = []

    def sample(model, tokenizer, prompts, counts, **kw):
        calls.append((prompts, counts, kw, getattr(model, "disabled", None)))
        index = [i for i, c in enumerate(counts) for _ in range(c)]
        texts = [f"{prompts[i][0]}#{k}" for i, c in enumerate(counts) for k in range(c)]
        # a prompt that mentions EOS ends with EOS, any other one at a stop string; 2 tokens each
        finish = ["eos" if "EOS" in prompts[i][0] else "stop" for i in index]
        return types.SimpleNamespace(prompt_index=index, texts=texts, completion_ids=[[1, 2]] * len(index),
                                     finish_reasons=finish, prompt_ids=[prompts[i] for i in index],
                                     logprobs=[[-0.5, -float(k)] for i, c in enumerate(counts) for k in range(c)])

    monkeypatch.setattr(co, "rollout", types.SimpleNamespace(   # the real adapter switch, rollout.weights, is kept
        encode_chat=lambda tok, messages: [" | ".join(m["content"] for m in messages)], sample=sample,
        weights=co.rollout.weights))
    monkeypatch.setattr(co, "rewards", types.SimpleNamespace(
        score_completion=lambda task, problem, text: (float(text.endswith("#0")), f"graded {problem['id']}")))
    return calls


def test_make_evaluate_dedupes_pairs_into_counts(fake_stack):
    task = types.SimpleNamespace(messages=lambda problem, system: [
        {"role": "system", "content": system}, {"role": "user", "content": problem["question"]}])
    p1, p2 = {"id": "a", "question": "q1"}, {"id": "b", "question": "q2"}
    evaluate = co.make_evaluate(None, None, task, max_new_tokens=8, temperature=0.7, top_p=0.9)
    out = evaluate(["A", "A", "B", "A"], [p1, p1, p1, p2])
    (prompts, counts, kw, _), = fake_stack
    assert prompts == [["A | q1"], ["B | q1"], ["A | q2"]] and counts == [2, 1, 1]
    assert kw["max_new_tokens"] == 8 and kw["temperature"] == 0.7 and kw["top_p"] == 0.9
    assert [o[:3] for o in out] == [("A | q1#0", 1.0, "graded a"), ("A | q1#1", 0.0, "graded a"),
                                    ("B | q1#0", 1.0, "graded a"), ("A | q2#0", 1.0, "graded b")]
    # each result carries its own sample's tokens and log-probs (fst.py trains on them: fast.reuse)
    assert [o.sampled.prompt_ids for o in out] == [["A | q1"], ["A | q1"], ["B | q1"], ["A | q2"]]
    assert [o.sampled.logprobs[1] for o in out] == [0.0, -1.0, 0.0, 0.0]


def test_make_reflector_switches_the_adapter_off_only_when_asked(fake_stack):
    class FakePeft:
        disabled = False

        @contextmanager
        def disable_adapter(self):
            self.disabled = True
            yield
            self.disabled = False

    model = FakePeft()
    free = dict(max_new_tokens=4, reply_format="free")
    assert co.make_reflector(model, None, use_adapter=False, **free)(["improve"]) == [co.Reflection("improve#0", 2)]
    co.make_reflector(model, None, use_adapter=True, **free)(["improve"])
    assert [c[3] for c in fake_stack] == [True, False] and model.disabled is False
    co.make_reflector(object(), None, use_adapter=False, **free)(["plain model runs as is"])


def test_make_reflector_batches_a_wave_and_starts_inside_the_fence(fake_stack):
    tokenizer = types.SimpleNamespace(encode=lambda text, add_special_tokens: [f"<{text}>"])
    reflect = co.make_reflector(None, tokenizer, use_adapter=False, max_new_tokens=4, temperature=0.7)
    replies = reflect(["improve A", "improve B, EOS"])
    (prompts, counts, kw, _), = fake_stack                       # the whole wave in ONE sample call
    assert prompts == [["improve A", "<```\n>"], ["improve B, EOS", "<```\n>"]] and counts == [1, 1]
    assert kw["stop"] == ["```"] and kw["temperature"] == 0.7
    # The opening fence is put back; a reply that ended with EOS instead of the fence is closed for it.
    assert replies == [co.Reflection("```\nimprove A#0", 2), co.Reflection("```\nimprove B, EOS#0\n```", 2)]
    assert co.extract_prompt(replies[1].text) == "improve B, EOS#0"
    assert co.extract_prompt("```\nPrompt body.\nLast line.```") == "Prompt body.\nLast line."  # cut at the fence
    with pytest.raises(ValueError, match="reply_format"):
        co.make_reflector(None, tokenizer, use_adapter=False, max_new_tokens=4, reply_format="json")


def test_a_paragraph_reply_ends_at_its_first_blank_line(fake_stack):
    """reply_format paragraph: a blank line ends the block as the closing fence does (the fake sampler's
    "stop" rows stopped at one), so the guards see a closed block; EOS closes it too."""
    tokenizer = types.SimpleNamespace(encode=lambda text, add_special_tokens: [f"<{text}>"])
    reflect = co.make_reflector(None, tokenizer, use_adapter=False, max_new_tokens=4, reply_format="paragraph")
    replies = reflect(["improve A", "improve B, EOS"])
    (_, _, kw, _), = fake_stack
    assert kw["stop"] == ["```", "\n\n"]
    assert [co.extract_prompt(r.text) for r in replies] == ["improve A#0", "improve B, EOS#0"]


def test_a_short_reply_that_repeats_the_worked_reflections_instruction_is_a_copy():
    """The worked reflection starts from "Convert the units.": a reply of just that (3 words, no 4-gram)
    copies the example too; and a reply equal to one of its instructions is a copy even when the parent
    holds the same words (a shortening of the parent that happens to be the example's start)."""
    example = " ".join(co.WORKED_REFLECTION)
    assert co.copies_example("Convert the units.", SEED, example)
    assert not co.copies_example("Count the letters carefully.", SEED, example)
    parent = "Convert the units. Reason briefly, then give the answer."
    assert co.vet_reflection("```\nconvert the units.\n```", parent, [], 2000) == (None, "copies_example")
    assert co.vet_reflection("```\nReason briefly.\n```", parent, [], 2000) == ("Reason briefly.", None)


def test_fenced_reflector_on_a_real_tokenizer(tiny_model, tokenizer):
    """The prefix is the fence's own tokens after the generation prompt; replies come back fenced."""
    import rollout
    reflect = co.make_reflector(tiny_model, tokenizer, use_adapter=False, max_new_tokens=3, temperature=0.0)
    replies = reflect(["Improve this prompt.", "And this one."])
    assert all(r.text.startswith("```\n") and 1 <= r.tokens <= 3 for r in replies)
    chat = rollout.encode_chat(tokenizer, [{"role": "user", "content": "x"}])
    prefix = tokenizer.encode("```\n", add_special_tokens=False)
    assert tokenizer.decode(chat + prefix).endswith("assistant\n```\n")


# ---------------------------------------------------------------- contexts: instruction + worked examples
DEMOS = (("What is 2 + 2?", "2 + 2 = 4.\nAnswer: 4"), ("What is 3 + 5?", "3 + 5 = 8.\nAnswer: 8"))


@pytest.mark.parametrize("name", sorted(__import__("rewards").TASKS))
def test_a_context_renders_for_every_task_as_turns_or_in_the_system_message(name):
    import rewards
    task = rewards.get_task(name, **({"seed": 0, "n_train": 2, "n_test": 2} if name != "gsm8k" else
                                     {"train_path": str(GSM8K_TEST), "test_path": str(GSM8K_TEST)}))
    problem = task.load("test")[0]
    own = task.messages(problem, "Be brief.")
    turns = Context("Be brief.", DEMOS, "turns").messages(task, problem)
    assert turns[0] == own[0] and turns[-len(own) + 1:] == own[1:]           # system first; the task's turns last
    assert turns[1:5] == [{"role": "user", "content": DEMOS[0][0]}, {"role": "assistant", "content": DEMOS[0][1]},
                          {"role": "user", "content": DEMOS[1][0]}, {"role": "assistant", "content": DEMOS[1][1]}]
    system = Context("Be brief.", DEMOS, "system").messages(task, problem)
    assert system[1:] == own[1:] and system[0]["content"] == (
        "Be brief.\n\nExample:\nProblem: What is 2 + 2?\nSolution: 2 + 2 = 4.\nAnswer: 4"
        "\n\nExample:\nProblem: What is 3 + 5?\nSolution: 3 + 5 = 8.\nAnswer: 8")
    assert Context("Be brief.").messages(task, problem) == own                # no demos: the plain prompt


def test_pool_json_round_trip_keeps_demos_and_the_format(tmp_path):
    pool = PromptPool(SEED, demo_format="system")
    child = pool.add(SEED, parent_id=0, step=6, operator="demo", demos=DEMOS, scores={"p00": 1.0})
    pool.save(tmp_path / "pool.json")
    loaded = PromptPool.load(tmp_path / "pool.json")
    assert loaded.demo_format == "system" and loaded[child.id] == child
    assert loaded.context(loaded[child.id]) == Context(SEED, DEMOS, "system") == pool.context(child)
    old = {"next_id": 1, "prompts": [{k: v for k, v in vars(pool[0]).items() if k != "demos"}]}  # saved before demos
    assert PromptPool.from_json(old).context(pool[0]) == Context(SEED, (), "system")


def test_demos_are_cut_at_the_answer_line():
    assert co.cut_to_answer("6 + 9 = 15.\nAnswer: 15\nNow another problem: 2 + 2") == "6 + 9 = 15.\nAnswer: 15"
    assert co.cut_to_answer("no answer line here\n") == "no answer line here"


def test_demo_operators_add_swap_and_drop_worked_examples():
    past = problems(12)[6:]
    buffer = [(p, f"{p['answer']} it is.\nAnswer: {p['answer']}\nextra chatter", 1.0) for p in past]
    r_pool = PromptPool(SEED)
    parent = r_pool.add(SEED, parent_id=0, step=0, operator="demo", demos=[(past[0]["question"], "x\nAnswer: 9")])
    r = co._Round(cfg=co.FastConfig(max_demos=2), pool=r_pool, anchors=problems(6), ids=[f"p{i:02d}" for i in range(6)],
                  questions=[], stats={}, evaluate=None, reflect=None, rng=random.Random(0), step=0, budget=0,
                  demo_buffer=buffer, size=3, most=6)
    added = co.OPERATORS["demo"].propose(r, parent, [0])
    assert added.text == SEED and len(added.demos) == 2 and added.demos[0] == tuple(parent.demos[0])
    assert added.demos[1][1].endswith("Answer: " + next(p["answer"] for p in past if p["question"] == added.demos[1][0]))
    assert "chatter" not in added.demos[1][1] and added.demos[1][0] != past[0]["question"]  # cut; not one it shows
    full = r_pool.add(SEED, parent_id=0, step=0, operator="demo", demos=added.demos)
    assert co.OPERATORS["demo"].propose(r, full, [0]) is None                 # max_demos reached: a skip
    swapped = co.OPERATORS["demo_swap"].propose(r, full, [0])
    before = {tuple(d) for d in full.demos}
    assert len(swapped.demos) == 2 and len(set(swapped.demos) & before) == 1      # one kept, one fresh
    dropped = co.OPERATORS["demo_drop"].propose(r, full, [0])
    assert len(dropped.demos) == 1 and dropped.demos[0] in before
    assert co.OPERATORS["demo_drop"].propose(r, r_pool[0], [0]) is None       # nothing to drop: a skip


def test_the_same_child_is_never_accepted_twice():
    past = problems(8)[6:]
    buffer = [(past[0], "6 + 9 = 15.\nAnswer: 15", 1.0)]                  # one demo to add: every draw proposes it
    stats = fast_round(pool := PromptPool(SEED), problems(6), settings(6, 60, operators=["demo"], wave=4),
                       evaluate=scorer(lambda text, problem: float("Answer: 15" in text)), reflect=pytest.fail,
                       step=6, rng=random.Random(0), demo_buffer=buffer)
    contexts = [pool.context(p) for p in pool]
    assert len(contexts) == len(set(contexts)) and stats["accepted"] == 1
    assert stats["rejected"]["duplicate"] >= 1                                # the wave's copies, then later draws


def test_an_accepted_child_is_rescored_on_every_anchor_with_fresh_draws():
    log, calls = [], []

    def evaluate(contexts, probs):
        calls.append(len(contexts))
        return scorer(lambda text, problem: float("Try" in text), log)(contexts, probs)
    stats = fast_round(pool := PromptPool(SEED), problems(6), settings(6, 12, wave=1), evaluate=evaluate,
                       reflect=each(lambda _: fenced(f"{SEED} Try harder.")), step=6, rng=random.Random(0))
    assert stats["accepted"] >= 1
    child_text = f"{SEED} Try harder."
    assert calls[2] == 6 and sum(text == child_text for text, _ in log[-6:]) == 6  # all 6 anchors, fresh
    assert all(s == 1.0 for s in pool.best().scores.values()) and len(pool.best().scores) == 6


def test_a_reply_that_copies_the_worked_reflection_is_rejected():
    _, revised = co.WORKED_REFLECTION
    copied = co.extract_prompt(revised)
    assert co.copies_example(copied, SEED, " ".join(co.WORKED_REFLECTION))
    assert not co.copies_example(f"{SEED} Add the tens first, then the ones.", SEED, " ".join(co.WORKED_REFLECTION))
    stats = fast_round(PromptPool(SEED), problems(6), settings(6, 30, wave=2), evaluate=scorer(lambda t, p: 0.0),
                       reflect=each(lambda _: revised), step=6, rng=random.Random(0))
    assert stats["rejected"]["copies_example"] == stats["proposals"] > 0 and stats["accepted"] == 0


def test_the_reflector_reads_a_worked_reflection_before_its_own_request():
    chat = co.build_reflection_prompt("Be brief.", [{"question": "Q?", "output": "O", "reward": 0.0,
                                                     "feedback": "Expected 3."}])
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    assert chat[1]["content"].startswith("```") and "Be brief." in chat[2]["content"] and "Expected 3." in chat[2]["content"]
