"""rewards.py -- tasks: load problems, turn them into chat messages, score a completion.

A task is one small class registered with @register_task: `load(split)` returns problem dicts
({"id", "question", "answer", ...task fields}) and `score(problem, completion)` returns
(reward in [0, 1], feedback written like a human grader's note). The slow loop uses only the reward;
the fast loop's reflection reads the feedback, so feedback says what was expected and why.
ProblemStream feeds batches in a deterministic, resumable order.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import operator
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from string import Template

from math_verify import parse, verify
from math_verify.errors import TimeoutException as MathVerifyTimeout  # a BaseException, not Exception

# For continual learning across tasks: one seed prompt that fits every task.
TASK_AGNOSTIC_PROMPT = ("Solve the problem. Reason briefly, step by step, then give your final answer "
                        "on a last line of the form 'Answer: <answer>'.")

TASKS: dict[str, type] = {}


def register_task(cls_or_name):
    """Makes a Task subclass known to get_task: `@register_task` (the class sets `name`) or `@register_task("name")`."""
    if isinstance(cls_or_name, str):
        def register(cls):
            cls.name = cls_or_name
            return register_task(cls)
        return register
    cls = cls_or_name
    if not cls.name or cls.name in TASKS:
        raise ValueError(f"task name {cls.name!r} is empty or already registered")
    TASKS[cls.name] = cls
    return cls


class TaskConfigError(ValueError):
    """A task that cannot be built as asked; `key` is the config key at fault within the task's section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def get_task(name: str, **options):
    """The registered task `name`, built with `options` (its constructor's keywords)."""
    if name not in TASKS:
        raise TaskConfigError("name", f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    accepted = inspect.signature(TASKS[name]).parameters
    for option in options:
        if option not in accepted:
            raise TaskConfigError(f"options.{option}", f"task {name!r} takes no option {option!r}; "
                                  f"its options are: {', '.join(accepted) or 'none'}")
    return TASKS[name](**options)


# The config's `task` section (fst.Config.task), and a stage of its continual `schedule`.
@dataclass
class TaskConfig:
    name: str = "gsm8k"  # a name registered in rewards.py
    system_prompt: str = ""  # the seed prompt; "" = the task's own default
    train_path: str | None = None  # gsm8k: local JSONL; null = hub openai/gsm8k
    test_path: str | None = None
    seed: int = 0  # procedural tasks: which problems get generated
    options: dict = field(default_factory=dict)  # any other keyword of the task's constructor (gsm8k: dataset)

    ranges = {"seed": "any"}


@dataclass
class StageConfig(TaskConfig):
    steps: int = 100  # continual learning: steps on this stage; a stage takes the task.* keys too

    ranges = TaskConfig.ranges | {"steps": ">= 1"}


def make_task(tc: TaskConfig):
    """The task of a config's task section (or a schedule stage). seed, train_path and test_path go only
    to a constructor that takes them (gsm8k the paths, a procedural task the seed); `options` go as given."""
    accepted = inspect.signature(TASKS[tc.name]).parameters if tc.name in TASKS else {}
    for key, path in (("train_path", tc.train_path), ("test_path", tc.test_path)):
        if path is not None and tc.name in TASKS and key not in accepted:
            raise TaskConfigError(key, f"task {tc.name!r} reads no data files (it generates its problems); "
                                  "remove the key")
    common = {"seed": tc.seed, "train_path": tc.train_path, "test_path": tc.test_path}
    return get_task(tc.name, **({k: v for k, v in common.items() if k in accepted} | dict(tc.options or {})))


def seed_prompt(task, system_prompt: str = "", continual: bool = False) -> str:
    """The prompt a run starts from: the config's, else the task's own; a continual run's is task-agnostic."""
    return system_prompt or (TASK_AGNOSTIC_PROMPT if continual else task.default_system_prompt)


def score_completion(task, problem: dict, completion: str) -> tuple[float, str]:
    """task.score that never raises: a broken scorer costs one sample's reward, not the run."""
    try:
        reward, feedback = task.score(problem, completion)
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward {reward} outside [0, 1]")
        return float(reward), str(feedback)
    except Exception as e:
        return 0.0, f"scoring error: {type(e).__name__}: {e}"


def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    """One JSON object per line (blank lines skipped); a bad line raises ValueError naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            rows.append(row)
    return rows


class Task:
    """Subclass, set `name` and `default_system_prompt`, write `load` and `score`, add @register_task.
    Constructor keyword arguments are the task's options (get_task checks them by name)."""
    name = ""
    default_system_prompt = TASK_AGNOSTIC_PROMPT

    def load(self, split: str) -> list[dict]:
        raise NotImplementedError

    def messages(self, problem: dict, system_prompt: str | None = None) -> list[dict]:
        prompt = self.default_system_prompt if system_prompt is None else system_prompt
        return [{"role": "system", "content": prompt}, {"role": "user", "content": problem["question"]}]

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        raise NotImplementedError

    def example_questions(self) -> list[str]:
        """The questions of the worked examples every chat shows: an evolved instruction must not paste one."""
        return []


class GeneratedTask(Task):
    """A procedural task: write `generate(rng) -> {"question", "answer", ...}` and `score`.
    Splits are deterministic in `seed`, questions are distinct, and no test question is in train."""

    def __init__(self, seed: int = 0, n_train: int = 5000, n_test: int = 500):
        self.seed = seed
        self.sizes = {"train": n_train, "test": n_test}
        self._splits: dict[str, list[dict]] = {}

    def generate(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def load(self, split: str) -> list[dict]:
        if split not in self.sizes:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        if not self._splits:
            seen: set[str] = set()
            for name in ("test", "train"):  # test first, so train can avoid its questions
                self._splits[name] = self._generate_split(name, seen)
        return [dict(problem) for problem in self._splits[split]]

    def _generate_split(self, split: str, seen: set[str]) -> list[dict]:
        # A str seed is hashed with SHA-512 by random.Random: the same on every machine and run.
        rng = random.Random(f"{self.name}-{self.seed}-{split}")
        problems, attempts = [], 0
        while len(problems) < self.sizes[split]:
            attempts += 1
            if attempts > 100 * self.sizes[split] + 1000:
                raise ValueError(f"{self.name}: only {len(problems)} distinct {split} problems "
                                 f"could be generated; ask for fewer")
            problem = self.generate(rng)
            if problem["question"] not in seen:
                seen.add(problem["question"])
                problems.append({"id": f"{self.name}-{split}-{len(problems)}", **problem})
        return problems


# ---------------------------------------------------------------- final answers
_ANSWER_LINE = re.compile(r"\banswer\s*\**\s*:[ \t]*(.*)", re.IGNORECASE)
_HASH_ANSWER = re.compile(r"####[ \t]*(.*)")  # GSM8K's own '#### 18'


def boxed_contents(text: str) -> list[tuple[int, str]]:
    r"""(position, content) of every \boxed{...}, with nested braces matched."""
    found = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((match.start(), text[match.end():i - 1]))
    return found


def final_answer(text: str, hashes: bool = False) -> str | None:
    r"""The model's final answer: the last \boxed{...} or 'Answer: ...' line, whichever comes last
    (so 'Answer: \boxed{7}' gives 7). An empty 'Answer:' line takes the next non-empty line.
    hashes=True also reads GSM8K's '#### N', but only where N is a plain number ('#### 1,450,000',
    '#### $18'), so a markdown heading ('#### Step 1', '#### 1. Compute') is never an answer."""
    candidates = boxed_contents(text)
    if hashes:
        for match in _HASH_ANSWER.finditer(text):
            value = match.group(1).strip().strip("*").strip()
            if re.fullmatch(_EXACT, _clean_number_text(value)):
                candidates.append((match.start(), value))
    for match in _ANSWER_LINE.finditer(text):
        value = match.group(1).strip()
        if not value:
            rest = [line for line in text[match.end():].splitlines() if line.strip()]
            value = rest[0] if rest else ""
        candidates.append((match.start(), value))
    if not candidates:
        return None
    # Markdown bold around the answer ('**Answer:** 7', 'Answer: **7**') is formatting, not content.
    answer = max(candidates, key=lambda c: c[0])[1].strip().removeprefix("**").removesuffix("**").strip()
    return answer or None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- numbers
# Digit caps keep Fraction() (which refuses > 4300 digits) safe. _EXACT: what Fraction reads exactly.
_NUMBER = re.compile(r"-?\d{1,40}(?:\.\d{1,40})?")
_EXACT = re.compile(r"-?\d{1,40}(?:\.\d{1,40})?|-?\d{1,40}/0*[1-9]\d{0,40}")  # 72, 72.0, 144/2


def _clean_number_text(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    for noise in ("\\$", "$", "\\%", "%", "\\!", "\\,", "{,}"):
        text = text.replace(noise, "")
    return text.strip().rstrip(".").strip()


def same_number(gold: str, given: str) -> bool:
    """Is the answer text `given` equal to the number `gold`? Plain numbers and fractions ('$1,000',
    '72.0', '\\frac{144}{2}') compare exactly; anything else ('72 apples', '2^3 \\cdot 9') goes to
    math-verify, then to the text's last number."""
    # '2 \\times 9 = 18', 'x = 18': a grader reads the value after the last '='.
    want, text = Fraction(_clean_number_text(gold)), _clean_number_text(given.rsplit("=", 1)[-1])
    if re.fullmatch(_EXACT, text):
        return Fraction(text) == want
    # math-verify bounds sympy with signal.alarm, which works only on the main thread; elsewhere we
    # skip it rather than risk an unbounded computation (sympy never finishes 9^9^9^9).
    if threading.current_thread() is threading.main_thread():
        try:
            # LaTeX ('3^2 \\cdot 2', '\\sqrt{324}') is only read as such between $...$
            latex = any(mark in text for mark in "\\^{")
            parsed = parse(f"${text}$" if latex else text, parsing_timeout=1, raise_on_error=True)
            if parsed:
                return verify(parse(gold, parsing_timeout=1, raise_on_error=True), parsed,
                              timeout_seconds=1, raise_on_error=True)
        except (Exception, MathVerifyTimeout):
            pass  # math-verify failed on this text: fall back to its last number below
    numbers = _NUMBER.findall(text)
    return bool(numbers) and Fraction(numbers[-1]) == want


def _no_answer(form: str, expected: str) -> str:
    return f"No final answer found: end with {form}. The expected answer was {expected}."


# ---------------------------------------------------------------- gsm8k
GSM8K_HUB_ID = "openai/gsm8k"  # config "main", splits train/test, columns question/answer


@register_task
class GSM8K(Task):
    name = "gsm8k"
    default_system_prompt = ("Solve the math word problem. Reason step by step, briefly, then give the "
                             "final answer as a number on a last line 'Answer: <number>'.")

    def __init__(self, train_path: str | None = None, test_path: str | None = None,
                 dataset: str = GSM8K_HUB_ID):
        self.paths = {"train": train_path, "test": test_path}
        self.dataset = dataset  # a split without a JSONL path comes from here (hub id or local copy)

    def load(self, split: str) -> list[dict]:
        if split not in self.paths:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        path = self.paths[split]
        rows = (read_jsonl(path, required=("question", "answer")) if path
                else load_hub_dataset(self.dataset, "main", split, required=("question", "answer")))
        problems = []
        for i, row in enumerate(rows):
            solution, sep, gold = row["answer"].rpartition("####")
            if not sep:
                raise ValueError(f"{path or self.dataset}: problem {i}: answer has no '#### <gold>'")
            problems.append({"id": f"gsm8k-{split}-{i}", "question": row["question"],
                             "answer": gold.strip().replace(",", ""),
                             # the worked solution, minus calculator notes <<48/2=24>>: reflection reads it
                             "solution": re.sub(r"<<[^>]*>>", "", solution).strip()})
        return problems

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        gold, given = problem["answer"], final_answer(completion, hashes=True)  # '#### N': GSM8K's own form
        reference = f"\nReference solution:\n{problem['solution']}" if problem.get("solution") else ""
        if given is None:
            return 0.0, _no_answer("\\boxed{N} or a line 'Answer: N'", gold) + reference
        if same_number(gold, given):
            return 1.0, f"Correct: {gold}."
        return 0.0, f"Expected {gold}, but your final answer was {_short(given)}." + reference


def load_hub_dataset(name: str, config: str, split: str, required: tuple[str, ...] = ()) -> list[dict]:
    """One split of a `datasets` dataset as a list of dicts: a hub id (downloaded once, then read from the
    HF cache) or a local folder laid out like the hub repository."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(f"loading {name!r} needs the `datasets` package (pip install -r requirements.txt); "
                          "or pass local JSONL paths (task.train_path / task.test_path)") from e
    # An unreachable hub: the local cache only, failing at once instead of after the client's retries.
    unreachable = not Path(name).exists() and not hub_reachable()
    try:
        with hub_offline() if unreachable else contextlib.nullcontext():
            data = load_dataset(name, config, split=split)
    except Exception as e:  # no network, unknown id, missing split: say what was asked and the way out
        reason = "the hub is unreachable and it is not in the local cache" if unreachable else \
            f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(f"could not load {name!r} (config {config!r}, split {split!r}) with `datasets`: "
                           f"{reason}. Offline? Pass local JSONL paths (task.train_path / task.test_path)") from e
    missing = [c for c in required if c not in data.column_names]
    if missing:
        raise ValueError(f"{name} ({config}, {split}): missing column(s) {', '.join(missing)}")
    return [dict(row) for row in data]


@functools.cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """Does one request reach the Hugging Face hub? Asked once per process; True in offline mode too
    (`datasets` then reads the cache itself)."""
    import huggingface_hub
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return True
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
    except Exception:  # no DNS, no route, a timeout: whatever the client raises, the hub is not there
        return False
    return True


@contextlib.contextmanager
def hub_offline():
    """`datasets` and the hub client in offline mode (cache only) for the block."""
    import datasets.config
    import huggingface_hub
    before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = before


# ---------------------------------------------------------------- safe arithmetic on expressions
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse_expression(text: str) -> tuple[ast.expr, list[int]]:
    """Parse (never run) an expression of integers, + - * / and parentheses; return the tree and the
    integers it uses. Anything else raises ValueError saying what is not allowed."""
    if len(text) > 200:
        raise ValueError("the expression is too long")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError("it is not a valid arithmetic expression") from None
    numbers = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if type(node.value) is not int:
                raise ValueError(f"{node.value!r} is not allowed: use only the given whole numbers")
            numbers.append(node.value)
        elif isinstance(node, ast.Name):
            raise ValueError(f"names like {node.id!r} are not allowed")
        elif isinstance(node, ast.Call):
            raise ValueError("function calls are not allowed")
        elif isinstance(node, ast.Attribute):
            raise ValueError("attribute access is not allowed")
        elif isinstance(node, ast.UnaryOp):
            raise ValueError("signs like -3 are not allowed: use only the given numbers")
        elif not isinstance(node, (ast.Expression, ast.BinOp, *_OPERATORS)):
            raise ValueError(f"{type(node).__name__} is not allowed: only integers, + - * / and parentheses")
    return tree.body, numbers


def evaluate(node: ast.expr, steps: list | None = None) -> Fraction:
    """Exact value of a tree from parse_expression; `steps` collects every intermediate result."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    value = _ARITHMETIC[_OPERATORS[type(node.op)]](evaluate(node.left, steps), evaluate(node.right, steps))
    if steps is not None:
        steps.append(value)
    return value


def _as_python_expression(text: str) -> str:
    for symbol, op in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"),
                       ("÷", "/"), ("−", "-"), ("\\left", ""), ("\\right", ""), ("$", "")):
        text = text.replace(symbol, op)
    return text.strip()


# ---------------------------------------------------------------- arithmetic
_PEOPLE = [("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lena", "she"), ("Omar", "he"),
           ("Ava", "she"), ("Raj", "he"), ("Zoe", "she"), ("Ben", "he"), ("Ines", "she")]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "eggs"]
# (question, computation, largest a, b, c; 0 = unused). Numbers are drawn from 2..largest and a draw is
# kept only if every step stays a non-negative integer, so no template needs its own sampler.
_ARITHMETIC_TEMPLATES = [
    ("{N} has {a} {x}. {P} buys {b} more. How many {x} does {p} have now?", "{a} + {b}", 30, 30, 0),
    ("{N} has {a} {x}. {P} gives away {b}. How many {x} does {p} have left?", "{a} - {b}", 30, 30, 0),
    ("{N} buys {a} bags of {x} with {b} {x} in each bag. How many {x} does {p} buy?", "{a} * {b}", 9, 9, 0),
    ("{N} shares {a} {x} equally among {b} friends. How many {x} does each friend get?",
     "{a} / {b}", 60, 9, 0),
    ("{N} has {a} {x}. {P} buys {b} more, then gives away {c}. How many {x} does {p} have now?",
     "{a} + {b} - {c}", 20, 20, 20),
    ("{N} has {a} {x}. {P} loses {b}, then finds {c}. How many {x} does {p} have now?",
     "{a} - {b} + {c}", 20, 20, 20),
    ("{N} has {a} boxes with {b} {x} in each box, and {c} more {x} on the table. "
     "How many {x} does {p} have in total?", "{a} * {b} + {c}", 9, 9, 20),
    ("{N} buys {a} packs of {b} {x}, then gives away {c}. How many {x} does {p} have left?",
     "{a} * {b} - {c}", 9, 9, 20),
    ("{N} has {a} {x} and gets {b} more. {P} puts them into {c} equal piles. "
     "How many {x} are in each pile?", "({a} + {b}) / {c}", 30, 30, 6),
]


@register_task
class Arithmetic(GeneratedTask):
    name = "arithmetic"
    default_system_prompt = ("Solve the word problem. Reason briefly, then give the final answer as a "
                             "number on a last line 'Answer: <number>'.")

    def __init__(self, seed: int = 0, n_train: int = 5000, n_test: int = 500, format_reward: float = 0.0):
        super().__init__(seed, n_train, n_test)
        # Partial credit for a well-formed but wrong "Answer: <number>". A 135M model rarely ends
        # with that line at first; this gives RL a signal to learn the format before the arithmetic.
        self.format_reward = format_reward

    def generate(self, rng: random.Random) -> dict:
        question, computation, *largest = rng.choice(_ARITHMETIC_TEMPLATES)
        name, pronoun = rng.choice(_PEOPLE)
        while True:
            a, b, c = (rng.randint(2, top) if top else 0 for top in largest)
            expression = computation.format(a=a, b=b, c=c)
            steps: list[Fraction] = []
            value = evaluate(parse_expression(expression)[0], steps)
            if all(s >= 0 and s.denominator == 1 for s in steps):
                break
        text = question.format(N=name, P=pronoun.capitalize(), p=pronoun, x=rng.choice(_ITEMS), a=a, b=b, c=c)
        return {"question": text, "answer": str(value), "computation": f"{expression} = {value}"}

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        gold, given = problem["answer"], final_answer(completion)
        if given is None:
            return 0.0, _no_answer("a line 'Answer: N'", f"{gold} ({problem['computation']})")
        if same_number(gold, given):
            return 1.0, f"Correct: {problem['computation']}."
        partial = self.format_reward if re.fullmatch(r"-?[\d,]+(\.\d+)?\.?", given.strip()) else 0.0
        return partial, (f"Expected {gold}, but your final answer was {_short(given).rstrip('.')}. "
                     f"The correct computation: {problem['computation']}.")


# ---------------------------------------------------------------- countdown
def _int_range(value) -> tuple[int, int]:
    """An option that is one int or an inclusive (low, high) range."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@register_task
class Countdown(GeneratedTask):
    name = "countdown"
    default_system_prompt = ("Reach the target number by combining the given numbers with + - * / and "
                             "parentheses, using each number at most once. Think briefly, then give the "
                             "expression on a last line 'Answer: <expression>', e.g. 'Answer: (7 - 3) * 5'.")

    def __init__(self, seed: int = 0, n_train: int = 5000, n_test: int = 500, n_numbers=(3, 4)):
        super().__init__(seed, n_train, n_test)
        self.n_numbers = _int_range(n_numbers)
        if self.n_numbers[0] < 2:
            raise ValueError(f"countdown needs at least 2 numbers, got n_numbers={n_numbers}")

    def generate(self, rng: random.Random) -> dict:
        # The target is the value of a random expression over all the numbers, so it is always
        # reachable; every step must be a positive integer, as in the game show.
        count = rng.randint(*self.n_numbers)  # drawn once, so rejections do not favour fewer numbers
        while True:
            numbers = [rng.randint(1, 25) for _ in range(count)]
            parts = [(str(n), Fraction(n)) for n in numbers]
            while len(parts) > 1:
                (left, a), (right, b) = (parts.pop(rng.randrange(len(parts))) for _ in range(2))
                symbol = rng.choice("+-*/")
                value = _ARITHMETIC[symbol](a, b)
                if value <= 0 or value.denominator != 1:
                    break  # draw again
                parts.append((f"({left} {symbol} {right})", value))
            else:
                solution, target = parts[0][0][1:-1], parts[0][1]
                if target <= 250 and target not in numbers:
                    break
        listed = ", ".join(map(str, numbers))
        return {"question": f"Using the numbers {listed}, make {target}. You may use + - * / and "
                            f"parentheses, and each number at most once.",
                "answer": str(target), "numbers": numbers, "target": int(target), "solution": solution}

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        numbers, target = problem["numbers"], problem["target"]
        hint = f" One solution: {problem['solution']} = {target}."
        given = final_answer(completion)
        if given is None:
            return 0.0, _no_answer("a line 'Answer: <expression>'", f"an expression equal to {target}") + hint
        # '25 + 3 * 7 = 46' or '46 = 25 + 3 * 7': the expression is the longer side.
        expression = max(_as_python_expression(given).split("="), key=len).strip()
        try:
            tree, used = parse_expression(expression)
        except ValueError as e:
            return 0.0, f"Malformed expression {_short(expression)!r}: {e}." + hint
        available = Counter(numbers)
        for number, count in Counter(used).items():
            if number not in available:
                return 0.0, f"You used {number}, which is not among the numbers {numbers}." + hint
            if count > available[number]:
                return 0.0, (f"You used {number} {count} times, but it is given {available[number]} "
                             f"time(s): each number can be used at most once." + hint)
        try:
            value = evaluate(tree)
        except ZeroDivisionError:
            return 0.0, f"Your expression {expression} divides by zero." + hint
        if value == target:
            return 1.0, f"Correct: {expression} = {target}."
        return 0.0, f"Your expression {expression} equals {value}, not the target {target}." + hint


# ---------------------------------------------------------------- codeio
_WORDS = ["banana", "python", "river", "garden", "orange", "planet", "window", "silver", "rocket",
          "pencil", "island", "castle", "forest", "yellow", "dragon", "marble", "tunnel", "puzzle",
          "lemon", "cloud", "tiger", "piano", "apple", "music", "ocean", "robot", "sugar", "zebra",
          "basket", "candle", "donkey", "engine", "falcon", "guitar", "hammer", "jacket", "kitten",
          "ladder", "magnet", "napkin", "parrot", "rabbit", "saddle", "tomato", "velvet", "walnut"]


def _numbers(rng: random.Random) -> str:
    return str([rng.randint(0, 20) for _ in range(rng.randint(3, 6))])


# Program templates; the sampler fills in the $names. Each template has thousands of variants, so
# distinct-question sampling keeps the template mix even. A line '@trace a b' is not shown to the
# model; when we run the program it records a and b after each loop iteration, for the feedback.
_CODEIO_TEMPLATES = [
    ("total = $a\nfor i in range($n):\n    total += i * $k\n    @trace i total\nprint(total)",
     lambda r: dict(a=r.randint(0, 50), n=r.randint(2, 7), k=r.randint(1, 9))),
    ("x = $a\nfor i in range(1, $n):\n    if i % $m == 0:\n        x -= i\n    else:\n        x += $k\n"
     "    @trace i x\nprint(x)",
     lambda r: dict(a=r.randint(0, 50), n=r.randint(4, 9), m=r.randint(2, 4), k=r.randint(1, 5))),
    ("a, b = $a, $b\nfor _ in range($n):\n    a, b = b, a + b\n    @trace a b\nprint(a)",
     lambda r: dict(a=r.randint(0, 20), b=r.randint(1, 20), n=r.randint(2, 6))),
    ("nums = $nums\nbest = nums[0]\nfor x in nums:\n    if x $cmp best:\n        best = x\n"
     "    @trace x best\nprint(best)",
     lambda r: dict(nums=_numbers(r), cmp=r.choice("<>"))),
    ("word = \"$word\"\ncount = 0\nfor ch in word:\n    if ch in \"$letters\":\n        count += 1\n"
     "    @trace ch count\nprint(count)",
     lambda r: dict(word=r.choice(_WORDS), letters="".join(sorted(r.sample("aeiounrst", 3))))),
    ("nums = $nums\nresult = [x * $k for x in nums if x % 2 == $parity]\nprint(result)",
     lambda r: dict(nums=_numbers(r), k=r.randint(2, 4), parity=r.randint(0, 1))),
    ("nums = $nums\nnums.append($v)\nnums.sort()\nprint(nums[$i], sum(nums))",
     lambda r: dict(nums=_numbers(r), v=r.randint(0, 20), i=r.randint(0, 3))),
    ("n = $n\nsteps = 0\nwhile n > $stop:\n    if n % $d == 0:\n        n = n // $d\n    else:\n"
     "        n = n - 1\n    steps += 1\n    @trace n steps\nprint(steps)",
     lambda r: dict(n=r.randint(10, 200), d=r.randint(2, 3), stop=r.randint(1, 5))),
    ("s = \"$word\"\nout = \"\"\nfor i in range($start, len(s)):\n    if i % $m == 0:\n"
     "        out += s[i].upper()\n    else:\n        out += $other\n    @trace i out\nprint(out)",
     lambda r: dict(word=r.choice(_WORDS), start=r.randint(0, 2), m=r.randint(2, 3),
                    other=r.choice(["s[i]", "s[i] * 2", '"-"', '"#"', '"."']))),
    ("s = \"$word\"\nprint(s[$i:$j] + s[$last] * $k)",
     lambda r: dict(word=r.choice(_WORDS), i=r.randint(0, 2), j=r.randint(3, 5), last=r.randint(-3, -1),
                    k=r.randint(1, 3))),
]
_SAFE_BUILTINS = {"range": range, "len": len, "sum": sum, "str": str}


def run_program(template: str) -> tuple[str, str, list[str]]:
    """Our own generated program -> (source shown to the model, printed output, per-iteration trace).
    Only template code we wrote ever runs here; model text is never executed."""
    lines = template.splitlines()
    shown = "\n".join(line for line in lines if not line.strip().startswith("@trace"))
    runnable = "\n".join(  # '    @trace i x' -> '    _trace(i=i, x=x)'
        line[:len(line) - len(line.lstrip())] + f"_trace({', '.join(f'{v}={v}' for v in line.split()[1:])})"
        if line.strip().startswith("@trace") else line for line in lines)
    printed, trace = [], []
    builtins = {**_SAFE_BUILTINS, "print": lambda *args: printed.append(" ".join(map(str, args)))}
    namespace = {"__builtins__": builtins,
                 "_trace": lambda **values: trace.append(", ".join(f"{k}={v!r}" for k, v in values.items()))}
    exec(compile(runnable, "<codeio>", "exec"), namespace)
    return shown, "\n".join(printed), trace


def _normalise_output(text: str) -> str:
    text = " ".join(text.strip().strip("`").split())
    return re.sub(r"\s*([,\[\]()])\s*", r"\1", text)  # '[2, 4]' == '[2,4]'


@register_task
class CodeIO(GeneratedTask):
    name = "codeio"
    default_system_prompt = ("Predict exactly what the Python program prints. Trace it briefly, step by "
                             "step, then give the printed output on a last line 'Answer: <output>'.")

    def generate(self, rng: random.Random) -> dict:
        kind = rng.randrange(len(_CODEIO_TEMPLATES))
        template, sample = _CODEIO_TEMPLATES[kind]
        program, output, trace = run_program(Template(template).substitute(sample(rng)))
        return {"question": f"What does this Python program print?\n```python\n{program}\n```",
                "answer": output, "program": program, "trace": trace, "template": kind}

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        gold, given = problem["answer"], final_answer(completion)
        trace = problem.get("trace") or []
        steps = "; ".join(trace[:20]) + ("; ..." if len(trace) > 20 else "")
        explain = f" Values after each loop iteration: {steps}." if trace else ""
        if given is None:
            return 0.0, _no_answer("a line 'Answer: <printed output>'", gold) + explain
        if _normalise_output(given) == _normalise_output(gold):
            return 1.0, f"Correct: the program prints {gold}."
        return 0.0, f"The program prints {gold}, but your answer was {_short(given)}." + explain


# ---------------------------------------------------------------- star graph
@register_task
class StarGraph(GeneratedTask):
    name = "star_graph"
    default_system_prompt = ("Find the path from the start node to the target node in the directed graph. "
                             "Give the path on a last line 'Answer: <start>, <node>, ..., <target>'.")

    def __init__(self, seed: int = 0, n_train: int = 5000, n_test: int = 500, degree=(3, 5),
                 arm_length=(3, 5)):
        super().__init__(seed, n_train, n_test)
        self.degree, self.arm_length = _int_range(degree), _int_range(arm_length)

    def generate(self, rng: random.Random) -> dict:
        degree, length = rng.randint(*self.degree), rng.randint(*self.arm_length)
        centre, *others = rng.sample(range(1, max(100, 4 * degree * length)), 1 + degree * length)
        arms = [others[i * length:(i + 1) * length] for i in range(degree)]
        edges = [[u, v] for arm in arms for u, v in zip([centre] + arm, arm)]
        rng.shuffle(edges)
        path = [centre] + rng.choice(arms)
        listed = ", ".join(f"{u} -> {v}" for u, v in edges)
        return {"question": f"Edges: {listed}\nFind the path from {centre} to {path[-1]}.",
                "answer": ", ".join(map(str, path)), "edges": edges, "arms": arms,
                "start": centre, "target": path[-1], "path": path}

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        path, start, target = problem["path"], problem["start"], problem["target"]
        reveal = f" The path is {problem['answer']}."
        given = final_answer(completion)
        if given is None:
            return 0.0, _no_answer("a line 'Answer: <start>, ..., <target>'", problem["answer"])
        nodes = [int(n) for n in re.findall(r"\d+", given)]  # labels are positive: '4-17-9' is a path
        if nodes == path:
            return 1.0, f"Correct: {problem['answer']}."
        if not nodes:
            return 0.0, f"Your final answer {_short(given)!r} lists no nodes." + reveal
        if nodes[0] != start:
            return 0.0, f"The path must start at {start}, but yours starts at {nodes[0]}." + reveal
        edges = {tuple(edge) for edge in problem["edges"]}
        for u, v in zip(nodes, nodes[1:]):
            if (u, v) not in edges:
                return 0.0, f"Your path leaves the graph: there is no edge {u} -> {v}." + reveal
        if len(nodes) > 1 and nodes[1] != path[1]:
            return 0.0, (f"Your path goes down the arm {start} -> {nodes[1]}, but {target} is on the "
                         f"arm {start} -> {path[1]}." + reveal)
        return 0.0, f"Your path stops at {nodes[-1]} before reaching {target}." + reveal


# ---------------------------------------------------------------- one-step tasks for small models
# Easy procedural tasks for the CPU-scale studies (experiments/miniature.py): SmolLM2-135M scores 0 on
# countdown, codeio and star_graph, and RL cannot learn from groups that are all wrong. These hold a
# worked example as an earlier turn of the chat, which a 135M model follows far more often than an
# example inside the system prompt (compare, 32 problems x 4: 0 of 128 right with the example in the
# system prompt, 20-25% as a turn; results/miniature/base_accuracy.json). The example then does not
# depend on the system prompt, which the fast loop evolves and a continual run keeps task-agnostic.

EXAMPLE_PLACES = ("turn", "system", "none")


class ExampleTask(GeneratedTask):
    """A generated task with a one-number or one-word answer and a worked example turn.
    Subclasses set `example` = (question, solution ending 'Answer: ...') and `answer_kind`, and
    `generate` returns "rule": why the answer is what it is, which the feedback shows as a grader would."""
    example: tuple[str, str] = ("", "")
    answer_kind = "number"  # "number": compared as numbers; "word": compared ignoring case

    def __init__(self, seed: int = 0, n_train: int = 5000, n_test: int = 500, format_reward: float = 0.0,
                 example_in: str = "turn"):
        super().__init__(seed, n_train, n_test)
        self.format_reward = format_reward  # partial credit for a well-formed wrong 'Answer: ...'
        # Where the worked example sits: "turn" (an earlier chat turn), "system" (after the system prompt's
        # text, where a 135M model rarely follows it: a start near the floor, miniature study 4) or "none".
        if example_in not in EXAMPLE_PLACES:
            raise TaskConfigError("options.example_in",
                                  f"example_in {example_in!r}: one of {', '.join(EXAMPLE_PLACES)}")
        self.example_in = example_in

    def messages(self, problem: dict, system_prompt: str | None = None) -> list[dict]:
        question, solution = self.example
        prompt = self.default_system_prompt if system_prompt is None else system_prompt
        if self.example_in == "system":  # rendered as a context's demos are with fast.demo_format=system
            prompt += f"\n\nExample:\nProblem: {question}\nSolution: {solution}"
        example = ([{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
                   if self.example_in == "turn" else [])
        return [{"role": "system", "content": prompt}, *example, {"role": "user", "content": problem["question"]}]

    def example_questions(self) -> list[str]:
        return [] if self.example_in == "none" else [self.example[0]]

    def score(self, problem: dict, completion: str) -> tuple[float, str]:
        gold, given = problem["answer"], final_answer(completion)
        form = "a line 'Answer: N'" if self.answer_kind == "number" else "a line 'Answer: <word>'"
        if given is None:
            return 0.0, _no_answer(form, f"{gold} ({problem['rule']})")
        if self.answer_kind == "number":
            right = same_number(gold, given)
            well_formed = re.fullmatch(r"-?[\d,]+(\.\d+)?\.?", given.strip())
        else:
            word = given.strip().strip(".!'\"`*").strip()
            right, well_formed = word.lower() == gold.lower(), re.fullmatch(r"[A-Za-z]+", word)
        if right:
            return 1.0, f"Correct: {problem['rule']}."
        return (self.format_reward if well_formed else 0.0,
                f"Expected {gold}, but your final answer was {_short(given).rstrip('.')}: {problem['rule']}.")


_ONE_STEP_PROMPT = ("Answer the question. Reason briefly, then give the final answer on a last line "
                    "'Answer: <answer>'.")


@register_task
class Compare(ExampleTask):
    name = "compare"
    default_system_prompt = _ONE_STEP_PROMPT
    example = ("Which number is smaller, 83 or 38?", "38 has 3 tens and 83 has 8 tens, so 38 is smaller.\nAnswer: 38")

    def generate(self, rng: random.Random) -> dict:
        which = rng.choice(["larger", "smaller"])
        a = rng.randint(10, 999)
        digits = list(str(a))
        rng.shuffle(digits)
        # Half the pairs share their digits (47 / 74): the ones a model cannot get from the first digit.
        b = int("".join(digits)) if rng.random() < 0.5 else rng.randint(10, 999)
        if b == a or b < 10:
            b = a + rng.randint(1, 9)
        gold = max(a, b) if which == "larger" else min(a, b)
        return {"question": f"Which number is {which}, {a} or {b}?", "answer": str(gold), "numbers": [a, b],
                "rule": f"{gold} is {which} than {a + b - gold}"}


@register_task
class Add(ExampleTask):
    name = "add"
    default_system_prompt = _ONE_STEP_PROMPT
    example = ("What is 46 + 27?", "46 + 27 = 40 + 20 + 6 + 7 = 60 + 13 = 73.\nAnswer: 73")

    def generate(self, rng: random.Random) -> dict:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return {"question": f"What is {a} + {b}?", "answer": str(a + b), "rule": f"{a} + {b} = {a + b}"}


@register_task
class WordCount(ExampleTask):
    name = "word_count"
    default_system_prompt = _ONE_STEP_PROMPT
    example = ("How many words are in this list: lemon, cloud, tiger?",
               "The words are lemon (1), cloud (2), tiger (3).\nAnswer: 3")

    def generate(self, rng: random.Random) -> dict:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 9))]
        numbered = ", ".join(f"{w} ({i})" for i, w in enumerate(words, 1))
        return {"question": f"How many words are in this list: {', '.join(words)}?", "answer": str(len(words)),
                "words": words, "rule": f"the list has {len(words)} words: {numbered}"}


@register_task
class Alphabetical(ExampleTask):
    name = "alphabetical"
    default_system_prompt = _ONE_STEP_PROMPT
    answer_kind = "word"
    example = ("Which of these words comes first in alphabetical order: river, apple, magnet?",
               "The first letters are r, a, m; a comes first in the alphabet.\nAnswer: apple")

    def generate(self, rng: random.Random) -> dict:
        words = rng.sample(_WORDS, 3)
        gold = min(words)
        return {"question": f"Which of these words comes first in alphabetical order: {', '.join(words)}?",
                "answer": gold, "words": words,
                "rule": f"in alphabetical order they are {', '.join(sorted(words))}, so {gold} comes first"}


# ---------------------------------------------------------------- batches
class ProblemStream:
    """Batches of problems in a fresh shuffle each epoch, a function of (seed, epoch) only, so a run
    resumes exactly from `position` (batches drawn so far). An epoch is len(problems) // batch_size
    batches: the leftover problems wait for a later shuffle, so a batch never repeats a problem."""

    def __init__(self, problems: list[dict], batch_size: int, seed: int = 0):
        if not 0 < batch_size <= len(problems):
            raise ValueError(f"batch_size must be in 1..{len(problems)} (the number of problems), "
                             f"got {batch_size}")
        self.problems, self.batch_size, self.seed = list(problems), batch_size, seed
        self.batches_per_epoch = len(self.problems) // batch_size
        self.position = 0

    def _batch(self, position: int) -> list[dict]:
        epoch, k = divmod(position, self.batches_per_epoch)
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return [self.problems[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def next_batch(self) -> list[dict]:
        batch = self._batch(self.position)
        self.position += 1
        return batch

    def peek(self, n_batches: int) -> list[list[dict]]:
        """The next n_batches batches, without advancing (the fast loop's anchor set)."""
        return [self._batch(self.position + i) for i in range(n_batches)]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "n_problems": len(self.problems), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "n_problems"):
            mine = len(self.problems) if key == "n_problems" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: saved {key}={state[key]}, this stream has {mine}")
        self.position = int(state["position"])
