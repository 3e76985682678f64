"""The registries' contracts, checked for every entry: each fast-loop operator (context_opt's @operator)
and each task (rewards' @register_task), with the operator and the task README.md's "Adding ..."
registers, so a new entry is tested for free. (Every loss: test_losses.py.)"""
import copy
import inspect
import random

import pytest

import context_opt as co
import rewards
from conftest import GSM8K_TEST, GSM8K_TRAIN, readme_example_registered
from pool import PromptPool


def registry_entries(owner, attribute: str, example: str, readme_name: str):
    """A fixture over every entry of owner.<attribute> and README.md's example. The test gets a copy of
    the registry (it may replace entries), the example registered into that copy."""
    @pytest.fixture(params=sorted(set(getattr(owner, attribute)) | {readme_name}))
    def entry(request, monkeypatch):
        monkeypatch.setattr(owner, attribute, dict(getattr(owner, attribute)))
        if request.param != readme_name:
            yield request.param
            return
        with readme_example_registered(example, getattr(owner, attribute)) as name:
            assert name == readme_name
            yield name
    return entry


operator_name = registry_entries(co, "OPERATORS", "operator", "shorten")   # "shorten": README.md's example
task_name = registry_entries(rewards, "TASKS", "task", "capitals")             # "capitals": README.md's example


# ---------------------------------------------------------------- operators
SEED = "Add the two numbers. Give the final answer on a last line 'Answer: N'."
PAST = [{"id": f"past{i}", "question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(4)]
ANCHORS = [{"id": f"p{i:02d}", "question": f"Tom has {i} apples and buys {i + 3} more. How many now?",
            "answer": str(2 * i + 3)} for i in range(6)]


def score_all_zero(contexts, problems):
    """evaluate(): every rollout wrong, so no parent is ever perfect and every operator gets draws."""
    return [("Answer: 0", 0.0, f"Expected {p['answer']}, got 0.") for p in problems]


def test_every_operator_returns_a_proposal_of_its_parent_or_skips_with_its_reason(operator_name):
    """A round with only this operator, on a pool of a plain seed and a seed with a worked example,
    with rewarded past answers in the demo buffer. Each call gets (round, parent, minibatch) and returns
    None (counted under its registered skip reason) or a Proposal of that parent and minibatch with
    exactly one of a text and a reflection chat; it never changes the parent in place; a ready child
    differs from its parent; its worked examples are (question, answer) pairs, at most max_demos, none
    an anchor problem."""
    name = operator_name
    real, calls = co.OPERATORS[name], []

    def watched(r, parent, batch):
        before = (parent.text, copy.deepcopy(parent.demos))
        proposal = real.propose(r, parent, batch)
        assert (parent.text, parent.demos) == before, f"{name} changed its parent in place"
        calls.append((parent, list(batch), copy.copy(proposal)))  # as returned: the round fills it in later
        return proposal

    co.OPERATORS[name] = real._replace(propose=watched)
    pool = PromptPool(SEED)
    demo = (PAST[0]["question"], "0 + 1 = 1.\nAnswer: 1")
    with_demo = pool.add(SEED, parent_id=0, step=0, operator="demo", demos=[demo])
    with_demo.in_top_k = True  # live: the round scores it and draws parents from both
    buffer = [(p, f"{p['answer']} it is.\nAnswer: {p['answer']}", 1.0) for p in PAST[1:]]
    cfg = co.FastConfig(budget=10.0, minibatch=3, wave=2, max_demos=3, operators=[name])
    stats = co.fast_round(pool, ANCHORS, cfg, evaluate=score_all_zero, step=6, rng=random.Random(0),
                          reflect=lambda chats: ["```\nAdd.\n```"] * len(chats), demo_buffer=buffer)
    proposals = [(parent, batch, p) for parent, batch, p in calls if p is not None]
    assert proposals, f"{name} proposed nothing in a round where it could"
    assert stats["proposals_by_operator"] == {name: len(proposals)}
    if skips := len(calls) - len(proposals):
        assert real.skip and stats["skipped"][real.skip] == skips
    anchor_questions = {p["question"] for p in ANCHORS}
    for parent, batch, p in proposals:
        assert p.parent is parent and p.batch == batch
        assert (p.text is None) != (p.reflection_prompt is None)
        if p.reflection_prompt is not None:
            assert p.reflection_prompt[-1]["role"] == "user"
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in p.reflection_prompt)
        else:
            assert p.context(pool.demo_format) != pool.context(parent), f"{name} proposed its parent unchanged"
        if p.demos is not None:
            assert len(p.demos) <= cfg.max_demos
            assert all(isinstance(q, str) and isinstance(a, str) for q, a in p.demos)
            assert not anchor_questions & {q for q, _ in p.demos}


# ---------------------------------------------------------------- tasks
def offline_task(name: str) -> rewards.Task:
    """The task built without the network and small: gsm8k from the shared local copy, a generated task
    with small splits, any other with its defaults."""
    accepted = inspect.signature(rewards.TASKS[name]).parameters
    options = {}
    if "test_path" in accepted:
        options |= {"train_path": str(GSM8K_TRAIN), "test_path": str(GSM8K_TEST)}
    if "n_train" in accepted:
        options |= {"n_train": 40, "n_test": 20}
    return rewards.get_task(name, **options)


JUNK = ["", "I am not sure.", "Answer:", "\\boxed{", "Answer: \\boxed{}", "#### \nAnswer: 1/0",
        "Answer: " + "9" * 300, "Answer: __import__('os').getcwd()", "Answer: [[[(((", "Answer: zzz-not-an-answer"]


def test_every_task_loads_chats_and_scores_as_its_contract_says(task_name):
    """load(split): problems with a string id (unique), question and answer, the same on every load,
    no test question in train. messages(): chat turns, the system prompt first and the question last.
    score(problem, completion) -> (reward in [0, 1], feedback): the problem's own gold written as an
    'Answer:' line scores 1; junk and wrong answers score below 1 with feedback, and never raise."""
    task = offline_task(task_name)
    train, test = task.load("train"), task.load("test")
    assert train and test and task.load("test") == test
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    for split in (train, test):
        assert len({p["id"] for p in split}) == len(split)
        assert all(isinstance(p["id"], str) and isinstance(p["question"], str) and "answer" in p for p in split)
    assert all(isinstance(q, str) for q in task.example_questions())
    for problem in test[:5]:
        chat = task.messages(problem, "Be brief.")
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in chat)
        assert chat[0] == {"role": "system", "content": "Be brief."}
        assert chat[-1] == {"role": "user", "content": problem["question"]}
        assert task.messages(problem)[0]["content"] == task.default_system_prompt
        golds = [f"Answer: {problem[key]}" for key in ("answer", "solution") if isinstance(problem.get(key), str)]
        assert max(task.score(problem, gold)[0] for gold in golds) == 1.0, (problem, golds)
        for completion in JUNK:
            reward, feedback = task.score(problem, completion)
            assert isinstance(reward, float) and 0.0 <= reward < 1.0, (completion, reward)
            assert isinstance(feedback, str) and feedback.strip(), completion

