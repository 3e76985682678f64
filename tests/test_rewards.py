"""rewards.py: gsm8k grading on real data, procedural tasks agree with their own golds, countdown never
executes model text, ProblemStream order is deterministic and resumable, scorers never raise."""
import json
import threading

import pytest
from conftest import GSM8K_TEST

import rewards
from rewards import ProblemStream, get_task, score_completion

PROCEDURAL = ["arithmetic", "countdown", "codeio", "star_graph"]
# Every registered generated task, the one-step example tasks included: the generic checks loop over these.
GENERATED = sorted(name for name, cls in rewards.TASKS.items() if issubclass(cls, rewards.GeneratedTask))


@pytest.fixture(scope="module")
def gsm8k():
    task = get_task("gsm8k", train_path=None, test_path=str(GSM8K_TEST))
    return task, task.load("test")


def small(name, **options):
    return get_task(name, seed=3, n_train=300, n_test=60, **options)


# ---------------------------------------------------------------- gsm8k
def test_gsm8k_gold_extraction_on_real_lines(gsm8k):
    task, problems = gsm8k
    lines = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:20]]
    assert len(problems) == 1319
    for i, (line, problem) in enumerate(zip(lines, problems)):
        assert problem["id"] == f"gsm8k-test-{i}"
        assert problem["question"] == line["question"]
        assert problem["answer"] == line["answer"].split("####")[1].strip().replace(",", "")
        assert "<<" not in problem["solution"] and "####" not in problem["solution"]
    assert [p["answer"] for p in problems[:4]] == ["18", "3", "70000", "540"]
    assert problems[0]["solution"].startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    # golds written with thousands separators ('#### 2,125') come out as plain integers
    assert (problems[146]["answer"], problems[611]["answer"]) == ("2125", "1450000")
    assert all(p["answer"].lstrip("-").isdigit() for p in problems)
    for completion in ["Answer: 1,450,000", "\\boxed{1450000}", "Answer: $1,450,000.00"]:
        assert score_completion(task, problems[611], completion)[0] == 1.0


@pytest.mark.parametrize("completion", [
    "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n\\boxed{18}",
    "Answer: 18", "answer: $18", "**Answer:** 18 dollars.", "Answer: \\$18", "Answer: 18.0",
    "Answer:\n18", "\\boxed{\\frac{36}{2}}", "\\boxed{\\sqrt{324}}", "Answer: 3^2 \\cdot 2",
    "\\boxed{16 - 3 - 4 = 9, 9 \\cdot 2 = 18}", "Answer: 18 eggs", "Answer: \\boxed{18}", "Answer: 17\nOops. Answer: 18",
])
def test_gsm8k_right_answers_score_one(gsm8k, completion):
    task, problems = gsm8k
    reward, feedback = score_completion(task, problems[0], completion)
    assert (reward, feedback) == (1.0, "Correct: 18.")


@pytest.mark.parametrize("completion", ["Answer: 70,000", "\\boxed{70000}", "Answer: $70,000.00",
                                        "\\boxed{70{,}000}"])
def test_gsm8k_thousands_separators(gsm8k, completion):
    task, problems = gsm8k
    assert score_completion(task, problems[2], completion)[0] == 1.0


def test_gsm8k_gold_solutions_themselves_score_one(gsm8k):
    """GSM8K's own final-answer form, '#### N', is an answer: every reference solution of the test
    split, as written in the file (calculator notes and all), gets full reward."""
    task, problems = gsm8k
    lines = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    assert lines[0]["answer"].endswith("\n#### 18")
    failed = [i for i, (line, problem) in enumerate(zip(lines, problems))
              if score_completion(task, problem, line["answer"]) != (1.0, f"Correct: {problem['answer']}.")]
    assert not failed


@pytest.mark.parametrize("completion, reward", [
    ("#### 18", 1.0), ("9 * 2 = 18\n#### 18", 1.0), ("#### $18", 1.0), ("#### 18.00", 1.0), ("####18", 1.0),
    ("#### **18**", 1.0), ("She makes $18. #### 18", 1.0), ("#### 17", 0.0),
    # the last of \boxed{}, 'Answer:' and '####' wins
    ("Answer: 17\n#### 18", 1.0), ("#### 17\nAnswer: 18", 1.0), ("\\boxed{17}\n#### 18", 1.0),
    ("#### 18\n\\boxed{17}", 0.0), ("Answer: 18\n#### 17", 0.0), ("#### 17\n\\boxed{18}", 1.0),
    # markdown headings are not answers: '#### N' counts only when N is a plain number
    ("#### Step 1: eggs left\n16 - 3 - 4 = 9\n#### Step 2: money\nAnswer: 18", 1.0),
    ("Answer: 18\n#### Step 2: check the answer", 1.0),
    ("#### 18. Check\nShe has 9 eggs left.", 0.0),
])
def test_gsm8k_hash_answers_and_which_answer_wins(gsm8k, completion, reward):
    task, problems = gsm8k
    assert score_completion(task, problems[0], completion)[0] == reward


def test_gsm8k_hash_answer_with_thousands_separators(gsm8k):
    task, problems = gsm8k
    assert problems[611]["answer"] == "1450000"
    assert score_completion(task, problems[611], "So the total is 1,450,000.\n#### 1,450,000")[0] == 1.0
    reward, feedback = score_completion(task, problems[611], "#### 1. Add the costs\nThe total is 1,450,000.")
    assert reward == 0.0 and feedback.startswith("No final answer found")


def test_gsm8k_wrong_answer_feedback_names_both_and_shows_reference(gsm8k):
    task, problems = gsm8k
    reward, feedback = score_completion(task, problems[0], "so she makes 16 * 2 = 32\nAnswer: 32")
    assert reward == 0.0
    assert feedback.startswith("Expected 18, but your final answer was 32.")
    assert "Janet sells 16 - 3 - 4 = 9 duck eggs a day." in feedback and "<<" not in feedback
    # the last answer wins, even if an earlier one was right
    assert score_completion(task, problems[0], "\\boxed{18}\nActually, Answer: 19")[0] == 0.0
    assert score_completion(task, problems[0], "Answer: 18.5")[0] == 0.0


def test_gsm8k_no_answer(gsm8k):
    task, problems = gsm8k
    reward, feedback = score_completion(task, problems[3], "He runs a lot of meters, 540 maybe")
    assert reward == 0.0
    assert feedback.startswith("No final answer found") and "The expected answer was 540." in feedback


def test_gsm8k_pathological_answer_times_out_to_zero(gsm8k):
    # sympy would never finish 2^{100000000}; math-verify's timeout raises a BaseException we must catch.
    task, problems = gsm8k
    reward, feedback = score_completion(task, problems[0], "Answer: 2^{100000000}")
    assert reward == 0.0 and feedback.startswith("Expected 18, but your final answer was 2^{100000000}.")


def test_gsm8k_scoring_works_off_the_main_thread(gsm8k):
    # math-verify's signal-based timeout fails outside the main thread; we must not.
    task, problems = gsm8k
    results = []
    worker = threading.Thread(target=lambda: results.extend(
        score_completion(task, problems[0], c) for c in ["Answer: 18 eggs", "\\boxed{\\frac{36}{2}}",
                                                         "Answer: 17", "Answer: 9^9^9^9"]))
    worker.start()
    worker.join(timeout=30)
    assert [r for r, _ in results] == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "q", "answer": "a #### 1"', "bad JSON"),
    ('{"question": "q"}', "missing key(s) answer"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_data_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})
    path.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=f"data.jsonl:3: {message}".replace("(", r"\(").replace(")", r"\)")):
        get_task("gsm8k", test_path=str(path)).load("test")


def test_gsm8k_answer_without_gold_marker_raises(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="problem 0.*####"):
        get_task("gsm8k", test_path=str(path)).load("test")


# ---------------------------------------------------------------- registry and scoring guard
def test_get_task_errors():
    with pytest.raises(ValueError, match="arithmetic.*codeio.*countdown.*gsm8k.*star_graph"):
        get_task("no_such_task")
    with pytest.raises(rewards.TaskConfigError, match="n_numbers") as e:
        get_task("arithmetic", n_numbers=3)
    assert e.value.key == "options.n_numbers"  # so fst's start-up check can name the config key
    with pytest.raises(rewards.TaskConfigError, match="seed"):
        get_task("gsm8k", seed=1)
    assert set(PROCEDURAL + ["gsm8k"]) <= set(rewards.TASKS)


def test_score_completion_turns_errors_into_zero_reward():
    class Broken(rewards.Task):
        def score(self, problem, completion):
            raise KeyError("gold")

    class OutOfRange(rewards.Task):
        def score(self, problem, completion):
            return 2.0, "too good"

    assert score_completion(Broken(), {}, "x") == (0.0, "scoring error: KeyError: 'gold'")
    reward, feedback = score_completion(OutOfRange(), {}, "x")
    assert reward == 0.0 and feedback.startswith("scoring error: ValueError: reward 2.0")


def test_messages_use_default_or_given_system_prompt():
    task = small("arithmetic")
    problem = task.load("test")[0]
    assert task.messages(problem, None) == [{"role": "system", "content": task.default_system_prompt},
                                            {"role": "user", "content": problem["question"]}]
    assert task.messages(problem, rewards.TASK_AGNOSTIC_PROMPT)[0]["content"] == rewards.TASK_AGNOSTIC_PROMPT
    assert "Answer:" in rewards.TASK_AGNOSTIC_PROMPT


def test_final_answer_extraction():
    assert rewards.final_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert rewards.final_answer("\\boxed{a} then \\boxed{{b}c}") == "{b}c"
    assert rewards.final_answer("Answer: 3\nmore text\nFinal answer: 4 apples") == "4 apples"
    assert rewards.final_answer("**Answer:** 72") == rewards.final_answer("**Answer: 72**") == "72"
    assert rewards.final_answer("no answer here") is None
    assert rewards.final_answer("\\boxed{unclosed") is None
    # '#### N' is read only when asked (gsm8k): other tasks' answers are not numbers after hashes
    assert rewards.final_answer("#### 18") is None and rewards.final_answer("#### 18", hashes=True) == "18"
    assert rewards.final_answer("#### 1,450,000\nAnswer: 3", hashes=True) == "3"


# ---------------------------------------------------------------- procedural tasks
@pytest.mark.parametrize("name", GENERATED)
def test_generator_is_deterministic_unique_and_train_test_disjoint(name):
    train, test = small(name).load("train"), small(name).load("test")
    assert small(name).load("train") == train
    assert [p["id"] for p in train[:2]] == [f"{name}-train-0", f"{name}-train-1"]
    assert len(train) == 300 and len(test) == 60
    questions = [p["question"] for p in train + test]
    assert len(set(questions)) == len(questions)
    assert get_task(name, seed=4, n_train=300, n_test=60).load("test") != test
    for p in train + test:
        assert isinstance(p["id"], str) and isinstance(p["question"], str) and isinstance(p["answer"], str)


@pytest.mark.parametrize("name", PROCEDURAL)
def test_generator_and_checker_agree_on_gold(name):
    task = small(name)
    for problem in task.load("train") + task.load("test"):
        gold = problem["solution"] if name == "countdown" else problem["answer"]
        for completion in [f"Let me think.\nAnswer: {gold}", f"\\boxed{{{gold}}}"]:
            assert score_completion(task, problem, completion)[0] == 1.0, (problem, completion)
        reward, feedback = score_completion(task, problem, "I am not sure.")
        assert reward == 0.0 and feedback.startswith("No final answer found")
        wrong = {"arithmetic": lambda: str(int(problem["answer"]) + 1),
                 "codeio": lambda: problem["answer"] + "0",
                 "countdown": lambda: problem["answer"],  # the bare target: never a given number
                 "star_graph": lambda: ", ".join(map(str, problem["path"][:-1]))}[name]()
        assert score_completion(task, problem, f"Answer: {wrong}")[0] == 0.0, (problem, wrong)


@pytest.mark.parametrize("name", GENERATED)
def test_default_sizes_can_be_generated(name):
    task = get_task(name)
    assert len(task.load("train")) == 5000 and len(task.load("test")) == 500


def test_arithmetic_hand_made_cases():
    task = small("arithmetic")
    problem = {"id": "a", "question": "Tom has 12 apples. He buys 7 more, then gives away 5. How many?",
               "answer": "14", "computation": "12 + 7 - 5 = 14"}
    assert score_completion(task, problem, "12 + 7 = 19, 19 - 5 = 14.\nAnswer: 14")[0] == 1.0
    assert score_completion(task, problem, "Answer: 14 apples")[0] == 1.0
    reward, feedback = score_completion(task, problem, "Answer: 24")
    assert reward == 0.0 and "Expected 14, but your final answer was 24." in feedback
    assert "The correct computation: 12 + 7 - 5 = 14." in feedback
    for p in task.load("train"):
        expression, value = p["computation"].split(" = ")
        assert int(value) >= 0 and value == p["answer"]


def test_countdown_hand_made_cases():
    task = small("countdown")
    problem = {"id": "c", "question": "Using 3, 7, 25 make 46.", "answer": "46", "numbers": [3, 7, 25],
               "target": 46, "solution": "25 + 3 * 7"}
    for right in ["Answer: 25 + 3 * 7", "Answer: (7 * 3) + 25 = 46", "\\boxed{25 + 3 \\times 7}",
                  "Answer: 46 = 3 × 7 + 25", "Answer: (25 + 3 * 7)", "Answer: **7 * 3 + 25**"]:
        assert score_completion(task, problem, right)[0] == 1.0, right
    cases = {
        "Answer: 25 + 3 * 8": "You used 8, which is not among",
        "Answer: 25 + 7 * 3 + 3 - 3": "You used 3 3 times, but it is given 1 time(s)",
        "Answer: 25 + 3 + 7": "equals 35, not the target 46",
        "Answer: 25 / (7 - 7)": "You used 7 2 times",
        "Answer: 25 + 3 *": "Malformed expression",
        "Answer: 25 ** 3": "Pow is not allowed",
        "Answer: -3 + 25 + 7": "signs like -3",
        "Answer: 25 + 3.5": "3.5 is not allowed",
        "Answer: 25 + x": "names like 'x'",
    }
    for completion, expected in cases.items():
        reward, feedback = score_completion(task, problem, completion)
        assert reward == 0.0 and expected in feedback, (completion, feedback)
        assert "One solution: 25 + 3 * 7 = 46." in feedback
    zero = {**problem, "numbers": [3, 3, 25], "solution": "3 * 3"}
    assert "divides by zero" in score_completion(task, zero, "Answer: 25 / (3 - 3)")[1]


def test_countdown_never_executes_model_text(tmp_path, monkeypatch):
    task = small("countdown")
    problem = task.load("test")[0]
    marker = tmp_path / "pwned"
    monkeypatch.setattr("builtins.eval", lambda *a, **k: pytest.fail("eval called"))
    monkeypatch.setattr("builtins.exec", lambda *a, **k: pytest.fail("exec called"))
    attacks = {
        f"Answer: __import__('os').system('touch {marker}')": "function calls are not allowed",
        "Answer: ().__class__.__base__": "attribute access is not allowed",
        "Answer: open": "names like 'open' are not allowed",
        "Answer: [x for x in range(9**9)]": "ListComp is not allowed",
        "Answer: lambda: 1": "Lambda is not allowed",
        "Answer: " + "(" * 150 + "1" + ")" * 150: "too long",
    }
    for completion, expected in attacks.items():
        reward, feedback = score_completion(task, problem, completion)
        assert reward == 0.0 and expected in feedback, (completion, feedback)
    assert not marker.exists()


def test_codeio_hand_made_cases_and_trace():
    task = small("codeio")
    shown, output, trace = rewards.run_program(
        "total = 1\nfor i in range(3):\n    total += i * 2\n    @trace i total\nprint(total)")
    assert shown == "total = 1\nfor i in range(3):\n    total += i * 2\nprint(total)"
    assert output == "7" and trace == ["i=0, total=1", "i=1, total=3", "i=2, total=7"]
    problem = {"id": "k", "question": shown, "answer": output, "program": shown, "trace": trace}
    assert score_completion(task, problem, "The loop adds 0, 2, 4.\nAnswer: 7")[0] == 1.0
    reward, feedback = score_completion(task, problem, "Answer: 9")
    assert reward == 0.0 and "prints 7" in feedback and "i=1, total=3; i=2, total=7" in feedback
    listed = {"id": "l", "question": "", "answer": "[4, 8]", "trace": []}
    assert score_completion(task, listed, "Answer: [4,8]")[0] == 1.0
    assert score_completion(task, listed, "Answer: [8, 4]")[0] == 0.0
    kinds = {p["template"] for p in get_task("codeio", n_train=500, n_test=10).load("train")}
    assert kinds == set(range(len(rewards._CODEIO_TEMPLATES)))


def test_star_graph_hand_made_cases():
    task = small("star_graph")
    problem = {"id": "s", "question": "", "answer": "1, 2, 3", "start": 1, "target": 3, "path": [1, 2, 3],
               "edges": [[1, 2], [2, 3], [1, 4], [4, 5]], "arms": [[2, 3], [4, 5]]}
    assert score_completion(task, problem, "Answer: 1, 2, 3")[0] == 1.0
    assert score_completion(task, problem, "Answer: 1 -> 2 -> 3")[0] == 1.0
    assert score_completion(task, problem, "Answer: 1-2-3")[0] == 1.0
    cases = {"Answer: 2, 3": "must start at 1", "Answer: 1, 3": "no edge 1 -> 3",
             "Answer: 1, 4, 5": "arm 1 -> 4, but 3 is on the arm 1 -> 2", "Answer: 1, 2": "stops at 2",
             "Answer: none": "lists no nodes", "Answer: 1, 2, 3, 5": "no edge 3 -> 5"}
    for completion, expected in cases.items():
        reward, feedback = score_completion(task, problem, completion)
        assert reward == 0.0 and expected in feedback and "The path is 1, 2, 3." in feedback, feedback
    for p in get_task("star_graph", degree=4, arm_length=3, n_train=20, n_test=5).load("train"):
        assert len(p["arms"]) == 4 and len(p["path"]) == 4 and len(p["edges"]) == 12


# ---------------------------------------------------------------- ProblemStream
def problems(n):
    return [{"id": str(i), "question": f"q{i}", "answer": str(i)} for i in range(n)]


def ids(batches):
    return [[p["id"] for p in batch] for batch in batches]


def test_stream_peek_equals_following_batches_across_epochs():
    stream = ProblemStream(problems(10), batch_size=3, seed=1)  # 3 batches per epoch
    stream.next_batch()
    ahead = stream.peek(5)
    assert stream.position == 1
    assert ids(ahead) == ids([stream.next_batch() for _ in range(5)])
    assert stream.position == 6 and stream.epoch == 2


def test_stream_epochs_reshuffle_and_batches_never_repeat_a_problem():
    stream = ProblemStream(problems(10), batch_size=3, seed=1)
    epochs = [sum(ids(stream.next_batch() for _ in range(3)), []) for _ in range(3)]
    assert all(len(set(epoch)) == 9 for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    same_seed = ProblemStream(problems(10), batch_size=3, seed=1)
    assert ids([same_seed.next_batch()]) == [epochs[0][:3]]
    assert ids(ProblemStream(problems(10), batch_size=3, seed=2).peek(3)) != ids(same_seed.peek(3))


def test_stream_state_dict_round_trip_resumes_identically():
    stream = ProblemStream(problems(10), batch_size=4, seed=7)
    for _ in range(5):
        stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))
    expected = ids([stream.next_batch() for _ in range(6)])
    resumed = ProblemStream(problems(10), batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert ids([resumed.next_batch() for _ in range(6)]) == expected
    with pytest.raises(ValueError, match="n_problems"):
        ProblemStream(problems(11), batch_size=4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        ProblemStream(problems(3), batch_size=4)


def test_a_user_task_is_one_small_class(monkeypatch):
    monkeypatch.setattr(rewards, "TASKS", dict(rewards.TASKS))  # keep the real registry clean

    @rewards.register_task("capitals")
    class Capitals(rewards.Task):
        def __init__(self, lowercase: bool = True):
            self.lowercase = lowercase

        def load(self, split):
            return [{"id": "capitals-0", "question": "Capital of France?", "answer": "Paris"}]

        def score(self, problem, completion):
            got = rewards.final_answer(completion) or ""
            return float(got.lower() == problem["answer"].lower()), "graded"

    @rewards.register_task
    class Named(rewards.Task):
        name = "named"

    task = get_task("capitals", lowercase=False)
    assert task.name == "capitals" and task.lowercase is False and isinstance(get_task("named"), Named)
    assert score_completion(task, task.load("test")[0], "Answer: **paris**") == (1.0, "graded")
    with pytest.raises(rewards.TaskConfigError, match="'uppercase'.*lowercase"):
        get_task("capitals", uppercase=True)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_task("named")(Capitals)


# ---------------------------------------------------------------- one-step tasks with an example turn
EXAMPLE_TASKS = ["compare", "add", "word_count", "alphabetical"]


def recompute(name, question):
    """The answer worked out again from the question text alone, independently of the generator."""
    import re
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    words = re.findall(r"[a-z]+", question.split(":", 1)[-1])
    if name == "compare":
        return str(max(numbers) if "larger" in question else min(numbers))
    if name == "add":
        return str(sum(numbers))
    if name == "word_count":
        return str(len(words))
    return sorted(words)[0]  # alphabetical


@pytest.mark.parametrize("name", EXAMPLE_TASKS)
def test_example_task_generator_agrees_with_checker(name):
    """Every generated gold equals the answer recomputed from the question, scores 1 in the forms a
    model writes it, and a wrong answer gets the format credit only, with the rule in the feedback."""
    task = small(name, format_reward=0.1)
    for problem in task.load("train") + task.load("test"):
        gold = problem["answer"]
        assert gold == recompute(name, problem["question"]), problem
        for completion in [f"Let me think.\nAnswer: {gold}", f"\\boxed{{{gold}}}", f"Answer: **{gold}**."]:
            assert score_completion(task, problem, completion) == (1.0, f"Correct: {problem['rule']}.")
        reward, feedback = score_completion(task, problem, "I am not sure.")
        assert reward == 0.0 and feedback.startswith("No final answer found") and gold in feedback
        wrong = ("apple" if gold != "apple" else "zebra") if name == "alphabetical" else str(int(gold) + 1)
        reward, feedback = score_completion(task, problem, f"Answer: {wrong}")
        assert reward == 0.1  # well formed, wrong: the format credit only
        assert feedback == f"Expected {gold}, but your final answer was {wrong}: {problem['rule']}."
        assert score_completion(task, problem, "Answer: no idea at all")[0] == 0.0  # malformed: nothing


def test_example_tasks_hand_made_cases():
    """Feedback names the expected answer and the reason; both directions of `compare` are asked."""
    compare = get_task("compare")
    problem = {"id": "c", "question": "Which number is larger, 47 or 74?", "answer": "74",
               "rule": "74 is larger than 47"}
    assert score_completion(compare, problem, "Answer: 47") == (
        0.0, "Expected 74, but your final answer was 47: 74 is larger than 47.")
    alpha = get_task("alphabetical")
    problem = {"id": "a", "question": "...", "answer": "cloud", "rule": "cloud comes first"}
    assert score_completion(alpha, problem, "Answer: Cloud.")[0] == 1.0  # case and a full stop do not matter
    asks = [p["question"].split(",")[0] for p in compare.load("test")]
    assert 150 < asks.count("Which number is smaller") < 350  # both directions are asked


@pytest.mark.parametrize("name", EXAMPLE_TASKS)
def test_example_turn_comes_before_the_problem_under_any_system_prompt(name):
    task = small(name)
    problem = task.load("test")[0]
    question, solution = task.example
    assert task.messages(problem, "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
        {"role": "assistant", "content": solution}, {"role": "user", "content": problem["question"]}]
    assert task.messages(problem)[0]["content"] == task.default_system_prompt
    # the example's own answer is what the example's question asks for, in the form the scorer reads
    assert rewards.final_answer(solution) == recompute(name, question)


def test_example_in_moves_the_worked_example_into_the_system_text_or_drops_it():
    """example_in=system: the example follows whatever system prompt is given (an evolved one too), as a
    context's demos read with demo_format=system; none: no example anywhere; another place is refused."""
    task = small("add", example_in="system")
    problem = task.load("test")[0]
    question, solution = task.example
    assert task.messages(problem, "Be brief.") == [
        {"role": "system", "content": f"Be brief.\n\nExample:\nProblem: {question}\nSolution: {solution}"},
        {"role": "user", "content": problem["question"]}]
    assert task.example_questions() == [question]
    bare = small("add", example_in="none")
    assert bare.messages(problem, "Be brief.") == [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": problem["question"]}]
    assert bare.example_questions() == [] and bare.load("test") == task.load("test")
    with pytest.raises(rewards.TaskConfigError, match="example_in"):
        small("add", example_in="prompt")
