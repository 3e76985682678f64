"""context_opt.py -- the fast weights: keep and improve a small Pareto pool of system prompts.

Every T RL steps `fast_round` re-scores the pool on a fresh anchor set, proposes children of
Pareto-sampled parents in waves of several at once, guards against malformed proposals, and keeps a
child only if it strictly beats its parent, re-run beside it, on a minibatch. The children come from
operators, functions registered with @operator (GEPA-style reflective mutation, a bootstrapped worked
example): a new operator is one more such function.
The core is model-free: it calls two plain callables, `evaluate` and `reflect`. The thin adapters at
the bottom (make_evaluate, make_reflector) bind them to a model through rollout.py and rewards.py;
measure_accuracy there is the held-out measurement training's validation and eval.py share.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import infra

PERFECT = 1.0        # rewards live in [0, 1]; a prompt at 1.0 on a problem has nothing to learn there
REJECT_REASONS = ("empty", "no_fence", "too_long", "thinking", "same_as_parent", "duplicate", "copies_anchor",
                  "copies_question", "copies_example", "not_better")
DemoFormat = Literal["turns", "system"]   # worked examples as user/assistant turns, or inside the system text
# the reflector's reply: starts inside the block (paragraph: and ends at its first blank line), or free-form
ReplyFormat = Literal["fenced", "paragraph", "free"]
REPLY_FORMATS = typing.get_args(ReplyFormat)
FENCE = "```"
COPY_NGRAM = 8       # words per n-gram when looking for an anchor question pasted into a prompt
COPY_FRACTION = 0.5  # share of a question's n-grams found in the prompt that counts as a copy


# ---------------------------------------------------------------- settings (the config's `fast` section)
@dataclass
class FastConfig:
    every: int = 6  # T: a fast round after every T slow steps
    pool_size: int = 4  # K prompts used for rollouts
    budget: float = 5.0  # metric calls per round = budget x anchor-set size (paper: 5x)
    minibatch: int = 3  # anchor problems shown to the reflector
    # base: the policy with its adapter off (a frozen critic at no extra memory); policy: adapter on; a hub
    # id, folder, .gguf or alias of another causal LM, loaded once and frozen, that only writes proposals; or
    # openai:<model>, a model behind an OpenAI-compatible endpoint (vLLM, SGLang, llama-server, Ollama, hosted)
    reflector: str = "base"
    # openai:<model>: the endpoint's base URL (e.g. http://127.0.0.1:8080/v1); "" = OPENAI_BASE_URL. The key
    # is read from OPENAI_API_KEY only (never a config key, so never in a run folder); a local server needs none
    reflector_url: str = ""
    reflector_timeout: float = 120.0  # openai:<model>: seconds one call may take (a 1024-token reply, busy server)
    reflector_retries: int = 3  # openai:<model>: retries of a call (429, 5xx, timeout), with exponential backoff
    reflector_max_in_flight: int = 8  # openai:<model>: a wave's calls in flight at once (the server's queue)
    # proposal operators, taken in turn: names registered with @operator in context_opt.py (reflect, demo, ...)
    operators: list[str] = field(default_factory=lambda: ["reflect"])
    demo_buffer: int = 256  # rewarded RL rollouts kept as candidate worked examples (demo operators)
    max_demos: int = 4  # worked examples a context holds at most
    # turns: demos as user/assistant turns after the system message (DSPy's way; at 135M they lift accuracy
    # more than the same demos in the system text: results/miniature/demo_probe.json); system: in its text
    demo_format: DemoFormat = "turns"
    max_prompt_chars: int = 4000
    reflector_max_new_tokens: int = 1024
    reflector_temperature: float = 0.7
    reflector_top_p: float = 0.95
    # fenced: the reply starts in the block, stops at its end; paragraph: also at its first blank line (a
    # one-paragraph instruction: at 135M most fenced replies ran to the token limit unclosed); free: as written
    reflector_format: ReplyFormat = "fenced"
    wave: int = 4  # children proposed at once (reflections and scoring batched); 1 = one at a time
    rescore_parent: bool = True  # judge a child against a fresh rollout of its parent (fair); false = reuse
    max_proposals: int = 0  # end a round after this many proposals (0 = only budget and patience end it)
    patience: int = 10  # end a round after this many draws in a row that spend nothing (skips, guard rejections)
    # fst.py trains on the round's rollouts too (they are the current policy's): none (the paper); pool = the
    # live pool's anchor re-scores; all = also the wave's children, parents and accepted re-scores. (ours)
    # all: in study 1 (results/miniature) it reached rl's best accuracy in 361 rollouts against fst's 560
    reuse: Literal["none", "pool", "all"] = "all"
    reuse_max_age: int = 1  # kept rollouts train over the next reuse_max_age + 1 steps, each once, never older
    # rounds: every T steps the round samples the pool, children and parents on its anchor set (the paper's,
    # ~90 rollouts a round at tiny sizes); batch: a round only writes children (no rollouts), each tested in
    # the next RL batches beside its parent, and the pool is ranked on the RL rollouts' rewards (ours, issue 32)
    scoring: Literal["rounds", "batch"] = "rounds"
    # batch: the rollouts of a group given to the child it tests (the rest go to the pool as in rounds); the
    # default is one of the K = 4 slots of G = 8, so 3/4 of every group is from contexts that passed a test
    trial_rollouts: int = 2
    candidates: int = 2  # batch: children under test at once (the groups of a step take turns among them)
    trial_steps: int = 6  # batch: RL steps a child is tested in before it leaves candidacy untested
    # batch: the acceptance test's false-accept bound: a child no better than its parent enters the pool with
    # probability <= accept_alpha over its whole trial (a one-sided test at accept_alpha / trial_steps per step)
    accept_alpha: float = 0.1
    evidence_fade: float = 0.8  # batch: an RL reward measured n steps ago weighs fade**n in the fronts (weights move)
    # batch: a child's trial rows are RL data too (true, as E-SPL trains on every prompt's rollouts); false: they
    # are evidence only, and the KL pass and the update run on the pool's rows (advantages over those alone)
    train_on_trials: bool = True

    ranges = {"every": ">= 1", "pool_size": ">= 1", "budget": "> 0", "minibatch": ">= 1", "wave": ">= 1",
              "max_proposals": ">= 0", "patience": ">= 1", "max_demos": ">= 0", "reuse_max_age": ">= 0",
              "demo_buffer": ">= 1",  # the buffer keeps its last N entries: N = 0 would keep them all
              "max_prompt_chars": ">= 1", "reflector_max_new_tokens": ">= 1",
              "reflector_temperature": ">= 0", "reflector_top_p": "(0, 1]", "reflector_timeout": "> 0",
              "reflector_retries": ">= 0", "reflector_max_in_flight": ">= 1", "trial_rollouts": ">= 1",
              "candidates": ">= 1", "trial_steps": ">= 1", "accept_alpha": "(0, 1)", "evidence_fade": "(0, 1]"}

    def check(self, prefix: str = "") -> None:
        """What `ranges` cannot say: at least one operator, every one a registered one; a reflector model
        that can exist, or an endpoint's with a model name."""
        if self.reflector.startswith(infra.ENDPOINT_PREFIX):
            if not self.reflector[len(infra.ENDPOINT_PREFIX):].strip():
                raise infra.ConfigError(f"config key '{prefix}reflector' must name the endpoint's model: "
                                        f"{infra.ENDPOINT_PREFIX}<model>")
        elif self.reflector not in ("base", "policy") and (why := infra.model_name_problem(self.reflector)):
            raise infra.ConfigError(f"config key '{prefix}reflector' must be base, policy or a model "
                                    f"(or {infra.ENDPOINT_PREFIX}<model>, an endpoint's): {why}")
        if not self.operators:
            raise infra.ConfigError(f"config key '{prefix}operators' must name at least one of {list(OPERATORS)}")
        for i, name in enumerate(self.operators):
            if name not in OPERATORS:
                raise infra.ConfigError(
                    f"config key '{prefix}operators[{i}]' must be one of {list(OPERATORS)}, got {name!r}")


@dataclass(frozen=True)
class Context:
    """A fast weight as the model sees it: an instruction (the system message) and worked examples
    (question, solution), rendered before the problem. Hashable: equal contexts are one context."""
    instruction: str
    demos: tuple[tuple[str, str], ...] = ()
    demo_format: DemoFormat = "turns"

    def messages(self, task, problem: dict) -> list[dict]:
        """The chat for `problem`: the system message, the demos as user/assistant turns ("turns") or
        appended to the system text ("system"), then the task's own turns (its example, the question)."""
        if self.demo_format == "system":
            return task.messages(problem, self.text())
        own = task.messages(problem, self.instruction)
        turns = [m for q, a in self.demos for m in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": a})]
        return own[:1] + turns + own[1:]

    def text(self) -> str:
        """The whole context as one text: the instruction, then each demo as "Example: Problem ...
        Solution ..." (the "system" format's system message; logs and trackers show this too)."""
        return self.instruction + "".join(f"\n\nExample:\nProblem: {q}\nSolution: {a}" for q, a in self.demos)


def as_context(context: Context | str) -> Context:
    """A plain system prompt is a context without demos."""
    return context if isinstance(context, Context) else Context(context)


@dataclass
class Prompt:
    id: int
    text: str                                                  # the instruction: the system message
    parent_id: int | None
    born_step: int
    operator: str                                              # "seed" or the operator that made it
    scores: dict[str, float] = field(default_factory=dict)    # problem id -> reward, current anchors
    in_top_k: bool = False
    demos: list[list[str]] = field(default_factory=list)      # worked examples: [question, solution]

    def mean_score(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else float("-inf")


@dataclass
class Candidate:
    """fast.scoring batch: a child under test in the RL batches, not yet in the pool. Its id is a pool
    id (rollouts are logged under it); `strata` holds its test's evidence, one entry per group it was
    sampled in: {"problem", "step", "child": its rewards there, "parent": its parent's in the same group}."""
    id: int
    text: str
    parent_id: int
    born_step: int
    operator: str
    demos: list[list[str]] = field(default_factory=list)
    strata: list[dict] = field(default_factory=list)
    steps: int = 0                                             # RL steps it was sampled in so far


def dominates(a: Prompt, b: Prompt, problem_ids: Sequence[str]) -> bool:
    """a >= b on every problem and > on one; a missing score counts as minus infinity."""
    sa = [a.scores.get(pid, float("-inf")) for pid in problem_ids]
    sb = [b.scores.get(pid, float("-inf")) for pid in problem_ids]
    return all(x >= y for x, y in zip(sa, sb)) and any(x > y for x, y in zip(sa, sb))


class PromptPool:
    """The live prompts. Scores always refer to the current anchor set: re-scoring replaces them."""

    def __init__(self, seed_text: str | None = None, demo_format: DemoFormat = "turns"):
        self.prompts: dict[int, Prompt] = {}
        self.next_id = 0
        self.demo_format = demo_format
        self.candidates: list[Candidate] = []     # fast.scoring batch: children under test
        self.measured_at: dict[str, int] = {}     # fast.scoring batch: problem id -> the step its scores are from
        if seed_text is not None:
            self.add(seed_text, parent_id=None, step=0, operator="seed").in_top_k = True

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(list(self.prompts.values()))

    def __getitem__(self, prompt_id: int) -> Prompt:
        return self.prompts[prompt_id]

    def add(self, text: str, *, parent_id: int | None, step: int, operator: str,
            scores: dict[str, float] | None = None, demos=()) -> Prompt:
        prompt = Prompt(self.next_id, text, parent_id, step, operator, dict(scores or {}),
                        demos=[list(d) for d in demos])
        self.prompts[prompt.id] = prompt
        self.next_id += 1
        return prompt

    def retain(self, prompt_ids: set[int]) -> None:
        self.prompts = {i: p for i, p in self.prompts.items() if i in prompt_ids}

    def problem_ids(self) -> list[str]:
        return sorted({pid for p in self.prompts.values() for pid in p.scores})

    def pareto_front(self, problem_ids: Sequence[str] | None = None) -> dict[str, set[int]]:
        """Per problem, the ids of the prompts with the best score there (all tied ones)."""
        front = {}
        for pid in self.problem_ids() if problem_ids is None else problem_ids:
            scored = {p.id: p.scores[pid] for p in self.prompts.values() if pid in p.scores}
            if scored:
                best = max(scored.values())
                front[pid] = {i for i, s in scored.items() if s == best}
        return front

    def nondominated(self, problem_ids: Sequence[str] | None = None) -> list[Prompt]:
        pids = self.problem_ids() if problem_ids is None else problem_ids
        return [p for p in self.prompts.values()
                if not any(dominates(q, p, pids) for q in self.prompts.values() if q is not p)]

    def coverage(self, problem_ids: Sequence[str] | None = None,
                 weights: dict[str, float] | None = None) -> dict[int, float]:
        """Non-dominated prompt id -> number of problems on whose front it stands (each counted with its
        weight when given: fast.scoring batch fades old evidence). A dominator stands on every front its
        dominated prompt stands on, so dropping dominated ones changes no front."""
        front = self.pareto_front(problem_ids)
        weight = (lambda pid: 1) if weights is None else (lambda pid: weights.get(pid, 0.0))
        return {p.id: sum(weight(pid) for pid, ids in front.items() if p.id in ids)
                for p in self.nondominated(problem_ids)}

    def sample_parent(self, rng, problem_ids: Sequence[str] | None = None,
                      weights: dict[str, float] | None = None) -> Prompt:
        """A non-dominated prompt, drawn with probability proportional to its front coverage."""
        cover = self.coverage(problem_ids, weights)
        ids = list(cover)
        if not any(cover.values()):                  # nothing scored yet: every prompt is as good
            return self.prompts[rng.choice(ids)]
        return self.prompts[rng.choices(ids, weights=[cover[i] for i in ids])[0]]

    def top_k(self, k: int, problem_ids: Sequence[str] | None = None,
              weights: dict[str, float] | None = None) -> list[Prompt]:
        """The K prompts RL samples with: non-dominated, ranked by coverage, then mean score, then age."""
        cover = self.coverage(problem_ids, weights)
        ranked = sorted(cover, key=lambda i: (-cover[i], -self.prompts[i].mean_score(), i))[:k]
        for p in self.prompts.values():
            p.in_top_k = p.id in ranked
        return [self.prompts[i] for i in ranked]

    def context(self, prompt: Prompt | Candidate) -> Context:
        """What the model sees of a pool member (or of a child under test, fast.scoring batch)."""
        return Context(prompt.text, tuple(tuple(d) for d in prompt.demos), self.demo_format)

    def best(self) -> Prompt:
        return max(self.prompts.values(), key=lambda p: (p.mean_score(), -p.id))

    def to_json(self) -> dict:
        batch = {"candidates": [asdict(c) for c in self.candidates], "measured_at": self.measured_at}
        return {"next_id": self.next_id, "demo_format": self.demo_format,
                "prompts": [asdict(p) for p in self.prompts.values()],
                **(batch if self.candidates or self.measured_at else {})}  # fast.scoring rounds: as before

    @classmethod
    def from_json(cls, data: dict) -> PromptPool:
        pool = cls(demo_format=data.get("demo_format", "system"))  # pools saved before demos had none
        pool.prompts = {d["id"]: Prompt(**d) for d in data["prompts"]}
        pool.next_id = data["next_id"]
        pool.candidates = [Candidate(**c) for c in data.get("candidates", [])]
        pool.measured_at = dict(data.get("measured_at", {}))
        return pool

    def save(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp")                    # write then rename: a crash never leaves half a file
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> PromptPool:
        return cls.from_json(json.loads(Path(path).read_text()))


def best_context(ckpt: str | Path) -> Context | None:
    """The best context of a checkpoint's pool (instruction and demos); None when it saved no pool."""
    path = Path(ckpt) / "pool.json"
    if not path.exists():
        return None
    pool = PromptPool.load(path)
    return pool.context(pool.best())


def lineage(run: Path, prompt_id: int) -> list[str]:
    """The operators that made a pool member, oldest first (seed, demo, reflect, ...), from every pool
    file the run saved (ancestors a later round pruned are in the earlier files)."""
    seen = {}
    for path in sorted((Path(run) / "pool").glob("step_*.json")):
        seen |= {p["id"]: p for p in json.loads(path.read_text())["prompts"]}
    chain, at = [], seen.get(prompt_id)
    while at is not None:
        chain.insert(0, at["operator"])
        at = seen.get(at["parent_id"])
    return chain or ["seed"]


def best_of_run(run: str | Path) -> dict | None:
    """The best context of a run's last saved pool, for its end-of-run summary: instruction, demo count,
    born step and lineage; None when the run saved no pool (rl)."""
    pool_files = sorted((Path(run) / "pool").glob("step_*.json"))
    if not pool_files:
        return None
    top = PromptPool.load(pool_files[-1]).best()
    return {"instruction": top.text, "demos": len(top.demos), "born_step": top.born_step,
            "lineage": lineage(run, top.id)}


# ---------------------------------------------------------------- proposal guards
_FENCE = re.compile(r"(`{3,})[^\n`]*\n(.*?)\n?\1(?!`)", re.DOTALL)   # opening run, optional tag, body
_THINKING = re.compile(r"</?\s*(think|thinking|reasoning)\s*>", re.IGNORECASE)


def extract_prompt(reflector_output: str) -> str | None:
    """Body of the LAST closed fenced block (``` or longer, optional language tag), else None.
    The last one, because a reflector that thinks aloud may sketch drafts in earlier fences."""
    blocks = _FENCE.findall(reflector_output)
    return blocks[-1][1].strip() if blocks else None


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copies_text(prompt: str, question: str) -> bool:
    """Does the prompt hold a near copy of the question? Share of the question's word n-grams
    (n = COPY_NGRAM, or the whole question when shorter) that also occur in the prompt."""
    q = re.findall(r"\w+", question.lower())
    if not q:
        return False
    n = min(COPY_NGRAM, len(q))
    wanted = _ngrams(q, n)
    return len(wanted & _ngrams(re.findall(r"\w+", prompt.lower()), n)) >= COPY_FRACTION * len(wanted)


def check_proposal(text: str, parent_text: str, anchor_questions: Sequence[str],
                   max_chars: int) -> str | None:
    """The rejection reason of a candidate prompt, or None when it may be tried."""
    if not text.strip():
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    if _THINKING.search(text):
        return "thinking"
    if _normalised(text) == _normalised(parent_text):
        return "same_as_parent"
    if introduces_copy(text, parent_text, anchor_questions):
        return "copies_anchor"
    return None


def introduces_copy(text: str, parent_text: str, questions: Sequence[str]) -> bool:
    """Does `text` hold a near copy of one of `questions` that its parent does not? Only a copy the child
    INTRODUCES counts: problems recur across epochs, and a parent that already holds one (an old demo)
    must not make every child of its lineage unacceptable."""
    return any(copies_text(text, q) and not copies_text(parent_text, q) for q in questions)


def copies_example(text: str, parent_text: str, example_text: str, n: int = 4) -> bool:
    """Does a reflected instruction parrot the worked reflection (or the request around it) instead of
    reading its own attempts? At least half of the word n-grams it adds to its parent occur in
    `example_text` and are not in the parent. (At 135M most replies to a prompt with a worked example
    were copies of its revised instruction, written for the other task.)"""
    words = lambda t: re.findall(r"\w+", t.lower())  # noqa: E731
    n = max(1, min(n, len(words(text))))  # a reply shorter than n words ("Answer the question.") is still judged
    parent = _ngrams(words(parent_text), n)
    added = _ngrams(words(text), n) - parent
    banned = _ngrams(words(example_text), n) - parent
    return bool(added) and len(added & banned) >= COPY_FRACTION * len(added)


def vet_reflection(reflector_output: str, parent_text: str, anchor_questions: Sequence[str],
                   max_chars: int, seen_questions: Sequence[str] = ()) -> tuple[str | None, str | None]:
    """Raw reflector text -> (candidate instruction, None) or (None, rejection reason). `seen_questions`:
    the task's other questions the round knows (its demo buffer's problems, the task's own worked
    example); an instruction that pastes one is rejected as copies_question (the anchors': copies_anchor).
    Reflection is the only operator that writes an instruction; the demo operators' questions are demos."""
    if not reflector_output.strip():
        return None, "empty"
    text = extract_prompt(reflector_output)
    if text is None:
        return None, "no_fence"
    reason = check_proposal(text, parent_text, anchor_questions, max_chars)
    if reason is None and introduces_copy(text, parent_text, seen_questions):
        reason = "copies_question"  # a training question in the instruction teaches one answer, not the task
    if reason is None and (copies_example(text, parent_text, " ".join(WORKED_REFLECTION))
                           or _normalised(text).lower() in {_normalised(t).lower() for t in (WORKED_START, WORKED_REVISED)}):
        reason = "copies_example"  # parrots the worked reflection (also a reply equal to one of its instructions)
    return (None, reason) if reason else (text, None)


# ---------------------------------------------------------------- operators
@dataclass(kw_only=True)
class Proposal:
    """One child of a wave, from its parent's draw to the acceptance test. An operator returns it with
    exactly one of `text` (a ready candidate: the guards check it at once) and `reflection_prompt`
    (the wave's one reflect call writes the candidate from it, then the guards check that)."""
    parent: Prompt
    batch: list[int]                    # anchor indices of its minibatch
    text: str | None = None             # the candidate instruction, once built and vetted
    reflection_prompt: list[dict] | None = None  # the chat the reflector answers, for a child it writes
    demos: tuple[tuple[str, str], ...] | None = None  # the child's worked examples; None: the parent's
    operator: str = ""                  # the name it was registered under (set by _draw)
    reason: str | None = None           # why it was rejected, if it was

    @property
    def scored(self) -> bool:
        """Did it pass the guards (and so spend budget on its minibatch)?"""
        return self.text is not None and self.reason in (None, "not_better")

    def context(self, demo_format: DemoFormat) -> Context:
        demos = self.demos if self.demos is not None else tuple(tuple(d) for d in self.parent.demos)
        return Context(self.text, demos, demo_format)


class Operator(NamedTuple):
    propose: Callable[[_Round, Prompt, list[int]], Proposal | None]   # (round, parent, minibatch)
    skip: str | None                    # the `skipped` stat a None (nothing to propose) counts under


OPERATORS: dict[str, Operator] = {}     # name (as in FastConfig.operators) -> operator; filled by @operator


def operator(name: str, *, skip: str | None = None):
    """Register `propose(r, parent, batch) -> Proposal | None` as the operator `name`: it reads what it
    needs from the round `r` (anchors, rollouts so far, rng, demo buffer) and returns a Proposal (see
    there) or None to skip this draw, counted as `skip` in the round's stats. That is the whole of an
    operator: the round draws the parent and minibatch, and reflects, vets, scores and accepts."""
    def register(propose):
        if name in OPERATORS:
            raise ValueError(f"operator {name!r} is registered twice")
        OPERATORS[name] = Operator(propose, skip)
        return propose
    return register


def reflection_request(instruction: str, examples: Sequence[dict]) -> str:
    """The reflector's task: the current instruction and graded attempts made with it; examples are
    dicts with question, output (the model's full response), reward, feedback."""
    shown = "\n\n".join(
        f"### Attempt {n}\nProblem:\n{ex['question']}\n\nAssistant's full response:\n{ex['output']}\n\n"
        f"Reward: {ex['reward']:.2f}\nGrader feedback: {ex['feedback']}"
        for n, ex in enumerate(examples, 1))
    return (
        "You maintain the instruction (system prompt) of an AI assistant. Below are its current instruction "
        "and a few of its graded attempts made with it, each with the grader's feedback.\n\n"
        f"## Current instruction\n```\n{instruction}\n```\n\n## Graded attempts\n{shown}\n\n"
        "## Your task\n"
        "Work out what went wrong in the low-reward attempts. Then write the improved instruction: keep what "
        "still helps, and add the rule, check or answer format the feedback reveals, as general guidance for "
        "new problems of this kind (no answers to these problems, no copied problem text). Reply with the "
        "new instruction only, inside ONE fenced block (``` ... ```).")


# One worked reflection, for a task fst does not train on, shown to the reflector as an earlier turn: a
# small model follows an example of the reply it should write far more often than a description of it.
# Its text is banned from children (the copies_example guard): a reply that parrots it is rejected. Its
# starting instruction shares no words with the tasks' seed prompts: "Answer the question.", the seed
# prompts' own first sentence, once let a reply that copied it pass as a mere shortening of its parent.
WORKED_START = "Convert the units."
WORKED_REVISED = ("Convert the units. To turn minutes into seconds, multiply the minutes by 60 (never add 60). "
                  "Show the multiplication, then give the final answer on a last line 'Answer: <number>'.")
WORKED_REFLECTION = (
    reflection_request(WORKED_START, [
        {"question": "How many seconds are in 7 minutes?", "output": "7 minutes is 7 + 60 = 67 seconds.",
         "reward": 0.0, "feedback": "Expected 420 (7 x 60 = 420), but your final answer was 67. The reply "
                                    "also had no line 'Answer: N'."},
        {"question": "How many seconds are in 3 minutes?", "output": "3 x 60 = 180.\nAnswer: 180",
         "reward": 1.0, "feedback": "Correct: 3 x 60 = 180."}]),
    f"```\n{WORKED_REVISED}\n```")


def build_reflection_prompt(instruction: str, examples: Sequence[dict]) -> list[dict]:
    """The reflector's chat: the worked reflection as a user/assistant turn, then this request."""
    request, reply = WORKED_REFLECTION
    return [{"role": "user", "content": request}, {"role": "assistant", "content": reply},
            {"role": "user", "content": reflection_request(instruction, examples)}]


@operator("reflect")
def reflective_mutation(r: _Round, parent: Prompt, batch: list[int]) -> Proposal:
    """GEPA's reflective mutation: the reflector reads the parent's instruction and its graded attempts
    on the minibatch (its rollouts of this round) and rewrites the instruction; the demos stay."""
    examples = [{"question": r.questions[i], "output": r.outputs[parent.id, r.ids[i]][0],
                 "reward": r.outputs[parent.id, r.ids[i]][1], "feedback": r.outputs[parent.id, r.ids[i]][2]}
                for i in batch]
    return Proposal(parent=parent, batch=batch, reflection_prompt=build_reflection_prompt(parent.text, examples))


_ANSWER_LINE = re.compile(r"^[^\n]*\banswer\s*\**\s*:[^\n]*", re.IGNORECASE | re.MULTILINE)


def cut_to_answer(solution: str) -> str:
    """A worked example ends at its final answer line: what a rewarded completion said after it
    (a second problem it made up, chatter) would teach the model to go on talking."""
    lines = list(_ANSWER_LINE.finditer(solution))
    return solution[:lines[-1].end()].strip() if lines else solution.strip()


def fresh_demo(r: _Round, parent: Prompt) -> tuple[str, str] | None:
    """Bootstrapped few-shot: one of the policy's own fully rewarded past solutions (demo_buffer holds
    (problem, completion, reward) of earlier RL rollouts), cut to its answer line; never an anchor
    problem (its answer would leak into the set the child is judged on), never one the parent shows."""
    shown = {q for q, _ in parent.demos}
    judged_on = r.ids if r.judged_on is None else r.judged_on
    fresh = [(reward, problem["question"], completion) for problem, completion, reward in r.demo_buffer
             if reward >= PERFECT and str(problem["id"]) not in judged_on
             and problem["question"] not in shown and problem["question"] not in parent.text]
    if not fresh:
        return None
    _, question, completion = r.rng.choice(fresh)
    return question, cut_to_answer(completion)


def _with_demos(parent: Prompt, batch: list[int], demos: list) -> Proposal:
    return Proposal(parent=parent, batch=batch, text=parent.text, demos=tuple(tuple(d) for d in demos))


@operator("demo", skip="no_demo")
def add_demo(r: _Round, parent: Prompt, batch: list[int]) -> Proposal | None:
    """The parent plus one worked example (fresh_demo); a skip when it is full (fast.max_demos) or the
    buffer has none left to add."""
    demo = fresh_demo(r, parent) if len(parent.demos) < r.cfg.max_demos else None
    return None if demo is None else _with_demos(parent, batch, [*parent.demos, demo])


@operator("demo_swap", skip="no_swap")
def swap_demo(r: _Round, parent: Prompt, batch: list[int]) -> Proposal | None:
    """The parent with one of its worked examples (chosen at random) replaced by a fresh one."""
    demo = fresh_demo(r, parent) if parent.demos else None
    if demo is None:
        return None
    demos = list(parent.demos)
    demos[r.rng.randrange(len(demos))] = demo
    return _with_demos(parent, batch, demos)


@operator("demo_drop", skip="no_demo_to_drop")
def drop_demo(r: _Round, parent: Prompt, batch: list[int]) -> Proposal | None:
    """The parent without one of its worked examples (chosen at random): as the weights learn what a
    demo taught, the plainer context can win back its place."""
    if not parent.demos:
        return None
    demos = list(parent.demos)
    del demos[r.rng.randrange(len(demos))]
    return _with_demos(parent, batch, demos)


def _failures_first(scores: dict[str, float], problem_ids: list[str], size: int, rng) -> list[int] | None:
    """Indices of a minibatch among the problems the parent has `scores` (its rewards) on: its failures
    (in random order) first, then the rest; None when it is perfect on all of them, since then no child
    can strictly beat it. (fast.scoring rounds scores every parent on every anchor.)"""
    order = [i for i in range(len(problem_ids)) if problem_ids[i] in scores]
    rng.shuffle(order)
    order.sort(key=lambda i: scores[problem_ids[i]] >= PERFECT)   # stable: keeps the shuffle
    return None if not order or scores[problem_ids[order[0]]] >= PERFECT else order[:size]


# ---------------------------------------------------------------- one fast round
class Sampled(NamedTuple):
    """The tokens behind one scored rollout, as the sampler made them: what fst.py needs to train on a
    fast-round rollout later (fast.reuse) without sampling it again."""
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]              # the sampler's log p(token) at temperature 1: the behaviour policy
    finish_reason: str


class Scored(NamedTuple):
    """One rollout of a (context, problem) pair as evaluate() returns it. A scripted evaluate may return
    plain (completion, reward, feedback) tuples instead: the round reads results by position."""
    completion: str
    reward: float
    feedback: str
    sampled: Sampled | None = None     # None when no model sampled it


Evaluate = Callable[[list[Context], list[dict]], list["Scored | tuple[str, float, str]"]]
# on_rollouts(phase, contexts, problems, results) after every evaluate call of a round; phase is one of
# ROUND_PHASES: "pool" (the live pool on every anchor), "children" and "parents" (a wave's minibatch
# tests), "accepted" (accepted children on every anchor).
OnRollouts = Callable[[str, list[Context], list[dict], list], None]
ROUND_PHASES = ("pool", "children", "parents", "accepted")


class Reflection(NamedTuple):
    """One reply of the reflector: its text and the tokens generated for it; an endpoint's reply also
    its call's seconds, the model id that answered, and its error (a failed call: its proposal is skipped,
    reflector_error). A reflect() callable may return plain strings instead (a scripted reflector
    generates no tokens)."""
    text: str
    tokens: int = 0
    seconds: float = 0.0
    model: str = ""          # "" for an in-process reflector (its calls are not itemised)
    error: str = ""


Reflect = Callable[[list[list[dict]]], list["Reflection | str"]]  # reflector chats -> replies


@dataclass(kw_only=True)
class _Round:
    """What the phases of one fast_round share: its settings, the anchor set, every rollout result so
    far and the stats it returns. The phases below run in the order fast_round calls them."""
    cfg: FastConfig
    pool: PromptPool
    anchors: list[dict]
    ids: list[str]                      # the anchors' problem ids, aligned with anchors
    questions: list[str]                # the anchors' texts, for the reflector and the copy guard
    stats: dict
    evaluate: Evaluate
    reflect: Reflect
    rng: object
    step: int
    budget: int                         # metric calls of the proposal loop: int(cfg.budget x anchors)
    demo_buffer: Sequence
    size: int                           # minibatch size
    most: int                           # the most one proposal can cost on its minibatch
    # (prompt id, problem id) -> (completion, reward, feedback) of its latest rollout
    outputs: dict[tuple[int, str], tuple[str, float, str]] = field(default_factory=dict)
    on_rollouts: OnRollouts | None = None  # fast_round's caller sees every scored rollout (fst.py: reuse)
    seen_questions: list[str] = field(default_factory=list)  # the task's other known questions: no instruction
                                        # may paste one (the demo buffer's, the task's worked examples')
    scoring_calls: int = 0              # metric calls scoring the live pool: not charged to the budget
    front: Sequence[str] | None = None  # fast.scoring batch: the problems parents are drawn on (None: anchors)
    judged_on: Sequence[str] | None = None  # problems no demo may come from (None: the anchors, the children's
                                        # test set; batch tests them on RL problems not yet drawn: none)
    weights: dict[str, float] | None = None  # ...and each one's weight (fading evidence)
    turn: int = 0                       # draws so far: picks the next operator
    idle: int = 0                       # consecutive draws that spent nothing

    def spent(self) -> int:
        """Metric calls charged to the budget so far."""
        return self.stats["metric_calls"] - self.scoring_calls

    def run(self, contexts: list[Context], problems: list[dict], phase: str | list[str]) -> list:
        """evaluate() on aligned (context, problem) pairs, timed and counted, and shown to on_rollouts
        with its phase (one for the call, or one per pair); no call for no pairs."""
        if not contexts:
            return []
        started = time.perf_counter()
        results = self.evaluate(contexts, problems)
        self.stats["seconds_scoring"] += time.perf_counter() - started
        if len(results) != len(contexts):
            raise ValueError(f"evaluate returned {len(results)} results for {len(contexts)} pairs")
        self.stats["metric_calls"] += len(contexts)
        if self.on_rollouts:
            phases = [phase] * len(contexts) if isinstance(phase, str) else phase
            for name in ROUND_PHASES:
                if mine := [n for n, p in enumerate(phases) if p == name]:
                    self.on_rollouts(name, [contexts[n] for n in mine], [problems[n] for n in mine],
                                     [results[n] for n in mine])
        return results

    def record(self, prompt: Prompt, indices: list[int], results) -> None:
        for i, result in zip(indices, results, strict=True):
            prompt.scores[self.ids[i]] = result[1]
            self.outputs[prompt.id, self.ids[i]] = result

    def reject(self, proposal: Proposal, reason: str) -> None:
        proposal.reason = reason
        self.stats["rejected"][reason] += 1
        self.stats["rejected_by_operator"][proposal.operator][reason] += 1


def _new_stats(step: int, anchor_size: int, budget: int, cfg: FastConfig) -> dict:
    operators = cfg.operators
    skips = ["perfect_parent", *(OPERATORS[op].skip for op in operators if OPERATORS[op].skip),
             *(["reflector_error"] if cfg.reflector.startswith(infra.ENDPOINT_PREFIX) else [])]
    return {"step": step, "anchor_size": anchor_size, "budget": budget, "wave": cfg.wave, "metric_calls": 0,
            "waves": 0, "proposals": 0, "accepted": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0),
            "rejected_by_operator": {op: dict.fromkeys(REJECT_REASONS, 0) for op in operators},
            "skipped": dict.fromkeys(skips, 0), "proposals_by_operator": dict.fromkeys(operators, 0),
            "accepted_by_operator": dict.fromkeys(operators, 0), "accepted_prompts": [],
            "seconds_reflecting": 0.0, "seconds_scoring": 0.0, "seconds_proposing": 0.0, "reflector_tokens": 0,
            "reflector": cfg.reflector,
            "reflector_replies": []}  # an endpoint's calls, each {model, tokens, seconds, error}


def _score_live_pool(r: _Round) -> None:
    """Step 2 of the round: the prompts RL used since the last round, on every anchor. Survivors
    outside the top K are dropped here, since their scores belong to an old anchor set and re-scoring
    them all would eat the whole budget."""
    live = [p for p in r.pool if p.in_top_k] or list(r.pool)
    r.pool.retain({p.id for p in live})
    everything = list(range(len(r.anchors)))
    results = r.run([r.pool.context(p) for p in live for _ in r.anchors], r.anchors * len(live), "pool")
    for n, prompt in enumerate(live):
        prompt.scores = {}
        r.record(prompt, everything, results[n * len(r.anchors):(n + 1) * len(r.anchors)])
    r.stats["best_score_before"] = r.pool.best().mean_score()
    r.stats["mean_score_before"] = sum(p.mean_score() for p in live) / len(live)
    r.scoring_calls = r.stats["metric_calls"]


def _draw(r: _Round) -> Proposal | None:
    """One draw: parent, operator (cfg.operators in turn), minibatch, then the operator's proposal;
    None for a skip (a parent perfect everywhere, or an operator with nothing to propose)."""
    parent = r.pool.sample_parent(r.rng, r.front or r.ids, r.weights)
    name = r.cfg.operators[r.turn % len(r.cfg.operators)]
    r.turn += 1
    batch = _failures_first({pid: result[1] for (i, pid), result in r.outputs.items() if i == parent.id},
                            r.ids, r.size, r.rng)
    if batch is None:
        r.stats["skipped"]["perfect_parent"] += 1
        return None
    op, started = OPERATORS[name], time.perf_counter()
    proposal = op.propose(r, parent, batch)
    r.stats["seconds_proposing"] += time.perf_counter() - started
    if proposal is None:
        if op.skip is None:
            raise ValueError(f"operator {name!r} skipped a draw but registered no skip reason (@operator skip=)")
        r.stats["skipped"][op.skip] += 1
        return None
    if (proposal.text is None) == (proposal.reflection_prompt is None):
        has = "both text and" if proposal.text is not None else "neither text nor"
        raise ValueError(f"operator {name!r} returned a proposal with {has} reflection_prompt: "
                         "it must set exactly one")
    proposal.operator = name
    r.stats["proposals"] += 1
    r.stats["proposals_by_operator"][name] += 1
    return proposal


def _capped(r: _Round) -> bool:
    """Has the round made the most proposals it may (cfg.max_proposals; 0 = no cap)?"""
    return bool(r.cfg.max_proposals) and r.stats["proposals"] >= r.cfg.max_proposals


def _draw_wave(r: _Round) -> list[Proposal | None]:
    """Up to cfg.wave proposals, in draw order (None = a skip). A draw the budget could not score ends
    the wave before it is made; ready-made children (demo) meet the guards here, reflections after
    reflecting."""
    spent = r.spent()
    draws: list[Proposal | None] = []
    reserved, fresh_pairs, run_idle = 0, set(), r.idle
    while (sum(d is not None for d in draws) < r.cfg.wave and run_idle < r.cfg.patience
           and spent + reserved + r.most <= r.budget and not _capped(r)):
        proposal = _draw(r)
        draws.append(proposal)
        if proposal is None:
            run_idle += 1
            continue
        if proposal.reflection_prompt is None and (reason := _vet(r, proposal)):
            r.reject(proposal, reason)
            run_idle += 1
            continue
        new_pairs = ({(proposal.parent.id, i) for i in proposal.batch} - fresh_pairs if r.cfg.rescore_parent
                     else set())
        reserved += r.size + len(new_pairs)
        fresh_pairs |= new_pairs
        run_idle = 0                            # it may spend; the real count comes after scoring
    return draws


def _vet(r: _Round, proposal: Proposal) -> str | None:
    """The guards on a ready child's whole context (instruction and demos): check_proposal against its
    parent, and no copy of a context the pool already holds. (fast.scoring batch: a demo may be one of
    the recent RL problems the round reads, as the child is judged on later ones: its question is no copy.)"""
    child = proposal.context(r.pool.demo_format)
    shown = {q for q, _ in child.demos} if r.judged_on is not None else set()
    reason = check_proposal(child.text(), r.pool.context(proposal.parent).text(),
                            [q for q in r.questions if q not in shown], r.cfg.max_prompt_chars)
    return reason or ("duplicate" if any(child == r.pool.context(p) for p in r.pool) else None)


def _reflect_and_vet(r: _Round, proposals: list[Proposal]) -> None:
    """Every reflection of the wave in one batched call, then the guards."""
    reflecting = [p for p in proposals if p.reflection_prompt is not None]
    if not reflecting:
        return
    started = time.perf_counter()
    replies = r.reflect([p.reflection_prompt for p in reflecting])
    r.stats["seconds_reflecting"] += time.perf_counter() - started
    if len(replies) != len(reflecting):
        raise ValueError(f"reflect returned {len(replies)} replies for {len(reflecting)} prompts")
    for proposal, reply in zip(reflecting, replies):
        reply = reply if isinstance(reply, Reflection) else Reflection(reply)
        r.stats["reflector_tokens"] += reply.tokens
        if reply.model:                          # an endpoint's call, on the record
            r.stats["reflector_replies"].append({"model": reply.model, "tokens": reply.tokens,
                                                 "seconds": round(reply.seconds, 3), "error": reply.error})
        if reply.error:
            _skip_failed_call(r, proposal, reply.error)
            continue
        proposal.text, reason = vet_reflection(reply.text, proposal.parent.text, r.questions,
                                               r.cfg.max_prompt_chars, r.seen_questions)
        reason = reason or _vet(r, proposal)     # a reply that passed: its whole context, as a demo child's
        if reason:
            r.reject(proposal, reason)


def _skip_failed_call(r: _Round, proposal: Proposal, error: str) -> None:
    """A reflection whose call failed (after its retries) is a skip, reason reflector_error, not a
    proposal: nothing was proposed, nothing is spent, and the round goes on (patience counts it)."""
    proposal.reason = "reflector_error"
    r.stats["proposals"] -= 1
    r.stats["proposals_by_operator"][proposal.operator] -= 1
    r.stats["skipped"]["reflector_error"] = r.stats["skipped"].get("reflector_error", 0) + 1
    print(f"[fst] reflector call failed, proposal skipped (reflector_error): {error}", file=sys.stderr)


def _score_children(r: _Round, trying: list[Proposal]) -> tuple[list, dict[tuple[int, int], float]]:
    """Every surviving child on its minibatch, then (rescore_parent) each parent afresh, once per
    problem its children are judged on, all in one evaluate call. Returns the children's results
    (concatenated in `trying` order) and the parents' fresh rewards by (parent id, anchor index)."""
    if unready := [p.operator for p in trying if p.text is None]:
        raise RuntimeError(f"proposals of operators {unready} reached scoring without a candidate text")
    child_pairs = [(p.context(r.pool.demo_format), i) for p in trying for i in p.batch]
    parent_pairs = (list(dict.fromkeys((p.parent.id, i) for p in trying for i in p.batch))
                    if r.cfg.rescore_parent else [])
    pairs = child_pairs + [(r.pool.context(r.pool[pid]), i) for pid, i in parent_pairs]
    results = r.run([context for context, _ in pairs], [r.anchors[i] for _, i in pairs],
                    ["children"] * len(child_pairs) + ["parents"] * len(parent_pairs))
    fresh = {pair: result[1] for pair, result in zip(parent_pairs, results[len(child_pairs):], strict=True)}
    return results[:len(child_pairs)], fresh


def _accept(r: _Round, trying: list[Proposal], child_results: list,
            fresh: dict[tuple[int, int], float]) -> list[Prompt]:
    """Each child against its own parent, strictly; the accepted ones join the pool (a child equal to
    one accepted before it in this wave is a duplicate). Returns the accepted children."""
    accepted: list[Prompt] = []
    at = 0
    for proposal in trying:
        results, at = child_results[at:at + len(proposal.batch)], at + len(proposal.batch)
        parent = proposal.parent
        parent_sum = (sum(fresh[parent.id, i] for i in proposal.batch) if r.cfg.rescore_parent
                      else sum(parent.scores[r.ids[i]] for i in proposal.batch))
        if sum(result[1] for result in results) <= parent_sum:
            r.reject(proposal, "not_better")
            continue
        context = proposal.context(r.pool.demo_format)
        if any(context == r.pool.context(p) for p in r.pool):
            r.reject(proposal, "duplicate")
            continue
        child = r.pool.add(context.instruction, parent_id=parent.id, step=r.step, operator=proposal.operator,
                           demos=context.demos)
        accepted.append(child)
        r.stats["accepted"] += 1
        r.stats["accepted_by_operator"][proposal.operator] += 1
        r.stats["accepted_prompts"].append(context.text())
    return accepted


def _score_accepted(r: _Round, accepted: list[Prompt]) -> None:
    """The accepted children on every anchor with fresh draws, in one call: the minibatch draws that
    won a child its test are its lucky ones, and would flatter it on the Pareto front."""
    everything = list(range(len(r.anchors)))
    results = r.run([r.pool.context(child) for child in accepted for _ in everything], r.anchors * len(accepted),
                    "accepted")
    for n, child in enumerate(accepted):
        r.record(child, everything, results[n * len(everything):(n + 1) * len(everything)])


def _finish(r: _Round, started: float) -> dict:
    """Prune the pool to its Pareto front, mark the top K (cfg.pool_size) active, and close the stats."""
    r.pool.retain({p.id for p in r.pool.nondominated(r.ids)})
    active = r.pool.top_k(r.cfg.pool_size, r.ids)
    r.stats.update(best_score_after=r.pool.best().mean_score(),
                   mean_score_after=sum(p.mean_score() for p in active) / len(active),
                   pool_size=len(r.pool), top_k_ids=[p.id for p in active],
                   seconds=time.perf_counter() - started)
    return r.stats


def _check_round_settings(cfg: FastConfig, anchor_problems: Sequence[dict]) -> None:
    """Settings no round can run with fail before it spends anything, naming the setting."""
    if unknown := set(cfg.operators) - set(OPERATORS):
        raise ValueError(f"unknown operators {sorted(unknown)}; known: {list(OPERATORS)}")
    if not anchor_problems:
        raise ValueError("fast_round needs at least one anchor problem")
    if cfg.wave < 1:
        raise ValueError(f"wave must be >= 1, got {cfg.wave}")
    if cfg.max_proposals < 0:
        raise ValueError(f"max_proposals must be >= 0 (0 = no cap), got {cfg.max_proposals}")


def fast_round(pool: PromptPool, anchor_problems: Sequence[dict], cfg: FastConfig, *, evaluate: Evaluate,
               reflect: Reflect, step: int, rng, demo_buffer: Sequence = (), progress=None,
               on_rollouts: OnRollouts | None = None, task_questions: Sequence[str] = ()) -> dict:
    """Improve the pool in place on this round's anchor set, as `cfg` (the config's `fast` section)
    says; return stats.

    evaluate(prompt_texts, problems) scores aligned (prompt, problem) pairs, one rollout each, in one
    batched call -> [(completion, reward, feedback)]. reflect(prompts) -> one reply per reflection
    prompt (a Reflection or a str), all generated in one batched call. Problems are dicts with an
    "id" and a "question"; demo_buffer holds (problem, completion, reward) of earlier RL rollouts;
    task_questions are the task's own worked examples' (Task.example_questions). No reflected instruction
    may paste an anchor's question, a demo buffer problem's or one of task_questions (vet_reflection).

    The round proposes in waves of cfg.wave children: it draws that many parents (and their
    minibatches of cfg.minibatch) from the pool as it stands, each child from the next of
    cfg.operators in turn, builds every child (all reflections in one reflect call, ready-made ones
    such as demos beside them), vets them, scores every surviving child on its minibatch in one
    evaluate call, accepts or rejects each against its own parent (strict improvement), scores the
    accepted ones on the rest of the anchors in one more call, and repeats. wave=1 is the sequential
    loop: one proposal at a time, each seeing the children accepted before it.

    cfg.rescore_parent: the parent's side of the acceptance test is a fresh rollout of the parent on
    the child's minibatch, in the same evaluate call as the children (shared by its children in a
    wave, charged to the budget). The minibatch is picked from the parent's failures, so its anchor
    scores there are its unlucky draws: judged against those (rescore_parent=False) a child no better
    than its parent passes about twice as often as a fair test lets it.

    Budget = int(cfg.budget x len(anchors)) metric calls (rollouts) of the proposal loop (paper: 5x).
    Scoring the L live prompts on the anchor set first is the round's step 2 and is counted in
    metric_calls but not charged to the budget: with K = 4 it would otherwise eat 4/5 of it. A proposal
    joins a wave only while its minibatch (and its parent's, when re-scored) still fits, but an accepted
    child is always scored afresh on every anchor (its minibatch draws won its test: lucky ones), so
    metric_calls <= L * len(anchors) + budget + wave * len(anchors). cfg.patience consecutive draws
    that spend nothing (skips, guard rejections; counted in draw order, checked between waves) end the
    round: reflecting costs time too. cfg.max_proposals > 0 also ends it after that many proposals (skips are not proposals),
    so that two rounds can be compared at equal work (bench/fast_round.py). At the end the pool keeps
    its Pareto front, and its top cfg.pool_size prompts are marked for RL. progress(proposals=, spent=,
    budget=, accepted=, best=) is called after the pool's scoring and after every wave (a progress line).
    on_rollouts(phase, contexts, problems, results) sees every scored rollout, by ROUND_PHASES (fst.py
    keeps them as RL data: fast.reuse).
    """
    _check_round_settings(cfg, anchor_problems)
    t0 = time.perf_counter()
    anchors = list(anchor_problems)
    budget = int(cfg.budget * len(anchors))
    size = min(cfg.minibatch, len(anchors))
    seen = dict.fromkeys([*task_questions, *(problem["question"] for problem, _, _ in demo_buffer)])
    r = _Round(cfg=cfg, pool=pool, anchors=anchors, ids=[str(p["id"]) for p in anchors],
               questions=[p["question"] for p in anchors], seen_questions=list(seen),
               stats=_new_stats(step, len(anchors), budget, cfg), evaluate=evaluate, reflect=reflect, rng=rng,
               step=step, on_rollouts=on_rollouts, budget=budget, demo_buffer=demo_buffer,
               size=size, most=size * (2 if cfg.rescore_parent else 1))
    _score_live_pool(r)
    show = progress or (lambda **numbers: None)    # a progress line: proposals, budget spent, accepted, best
    show(proposals=0, spent=0, budget=budget, accepted=0, best=r.pool.best().mean_score())
    while r.spent() + r.most <= budget and r.idle < cfg.patience and not _capped(r):
        draws = _draw_wave(r)
        proposals = [d for d in draws if d]
        if proposals:
            r.stats["waves"] += 1
        _reflect_and_vet(r, proposals)
        trying = [p for p in proposals if p.reason is None]
        child_results, fresh = _score_children(r, trying)
        _score_accepted(r, _accept(r, trying, child_results, fresh))
        for draw in draws:                      # patience, in draw order
            r.idle = 0 if draw is not None and draw.scored else r.idle + 1
        show(proposals=r.stats["proposals"], spent=r.spent(), budget=budget, accepted=r.stats["accepted"],
             best=r.pool.best().mean_score())
    return _finish(r, t0)


def round_report(stats: dict) -> str:
    """One line on what a round changed: fast round @ step 6: 12 proposals, 2 accepted (demo, reflect),
    best anchor 0.42 -> 0.50, 95 s."""
    accepted = ", ".join(op for op, n in stats["accepted_by_operator"].items() for _ in range(n))
    under_test = f", {len(stats['under_test'])} under test in the RL batch" if "under_test" in stats else ""
    return (f"fast round @ step {stats['step']}: {stats['proposals']} proposals, {stats['accepted']} accepted"
            f"{f' ({accepted})' if accepted else ''}{under_test}, best anchor {stats['best_score_before']:.2f} -> "
            f"{stats['best_score_after']:.2f}, {stats['seconds']:.0f} s")


# ---------------------------------------------------------------- the round's rollouts as RL data
# fast.reuse: fst.py trains the next steps on the rollouts a round scored (they are the current policy's).
# The round makes them, so their record and schedule live here; fst.with_reused turns them into groups.

@dataclass(kw_only=True)
class KeptRollout:
    """A fast-round rollout kept as RL data (fast.reuse): plain lists, so it lives on the CPU and in the
    checkpoint's JSON, never as model tensors."""
    problem: dict
    prompt_id: int              # the pool prompt it was sampled under; -1: a child that never joined the pool
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]       # the sampler's (the behaviour policy's): the loss's old_logp
    finish_reason: str
    text: str
    reward: float
    feedback: str
    sampled_at: int             # the step whose weights sampled it (a round after step t: t + 1)
    due: int                    # the step that trains it


REUSED_PHASES = {"none": (), "pool": ("pool",), "all": ROUND_PHASES}


def keep_round_rollouts(scored: list, pool: PromptPool, step: int, max_age: int) -> list[KeptRollout]:
    """The rollouts a fast round after `step` scored, [(context, problem, result)], as RL data for the
    next max_age + 1 steps: one group per problem (every context that answered it), the groups dealt
    round-robin over those steps so that each trains once and none is older than max_age updates."""
    prompt_of = {pool.context(p): p.id for p in pool}
    by_problem: dict[str, list] = {}
    for context, problem, result in scored:
        if len(result) > 3 and result[3] is not None:   # a scripted evaluate has no tokens to train on
            by_problem.setdefault(str(problem["id"]), []).append((context, problem, result))
    kept = []
    for n, rows in enumerate(by_problem.values()):
        for context, problem, (text, reward, feedback, sampled) in rows:
            kept.append(KeptRollout(problem=problem, prompt_id=prompt_of.get(context, -1),
                                    prompt_ids=list(sampled.prompt_ids), completion_ids=list(sampled.completion_ids),
                                    logprobs=list(sampled.logprobs), finish_reason=sampled.finish_reason, text=text,
                                    reward=float(reward), feedback=feedback, sampled_at=step + 1,
                                    due=step + 1 + n % (max_age + 1)))
    return kept


def due_rollouts(kept: list[KeptRollout], step: int, max_age: int) -> tuple[list[KeptRollout], list[KeptRollout]]:
    """(the kept rollouts to train at `step`, the ones left for later). One past its due step or older
    than max_age updates is dropped: a reused rollout trains at most once, and never stale."""
    now = [k for k in kept if k.due == step and step - k.sampled_at <= max_age]
    return now, [k for k in kept if k.due > step]


def kept_groups(kept: list[KeptRollout]) -> list[list[KeptRollout]]:
    """The kept rollouts by problem, in order: the groups of two or more (one alone has no advantage)."""
    groups: dict[str, list[KeptRollout]] = {}
    for k in kept:
        groups.setdefault(str(k.problem["id"]), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def kept_as_rollouts(rows: list[KeptRollout]):
    """The rows as rollout.Rollouts, to join a step's own (sampled earlier: no tokens run now)."""
    import rollout
    return rollout.Rollouts(prompt_index=[-1] * len(rows), prompt_ids=[k.prompt_ids for k in rows],
                            completion_ids=[k.completion_ids for k in rows], logprobs=[k.logprobs for k in rows],
                            finish_reasons=[k.finish_reason for k in rows], texts=[k.text for k in rows])


# ---------------------------------------------------------------- which context each rollout uses
def assign_contexts(n_prompts: int, group_size: int, rng) -> list[int]:
    """Which pool prompt each of a problem's G rollouts uses (mixing within the group):
    G // K rollouts per prompt, the remainder on distinct random prompts; G < K: a random subset."""
    per_prompt, rest = divmod(group_size, n_prompts)
    choice = [i for i in range(n_prompts) for _ in range(per_prompt)]
    choice += rng.sample(range(n_prompts), rest)
    return sorted(choice)


class RolloutPlan(NamedTuple):
    """What to sample (distinct chat prompts, a count each) and which problem and pool prompt each sample serves."""
    chats: list[list[int]]   # token ids of each distinct (problem, pool prompt) chat
    counts: list[int]        # samples of each chat
    group: list[int]         # [R] the problem each sample answers, in sampling order
    prompt_id: list[int]     # [R] the pool prompt (or candidate) each sample was written under


def plan_rollouts(tok, task, problems: list[dict], pool: PromptPool, group_size: int, seed: int,
                  step: int, first: int = 0, trial_rollouts: int = 0) -> RolloutPlan:
    """Step 1: each problem's G rollouts spread over the pool's active contexts (one group each).
    `first`: the batch index of problems[0] (under torchrun a rank plans a slice of the batch), so a
    problem gets the same contexts whichever rank holds it. fast.scoring batch (trial_rollouts > 0)
    while children are under test: trial_rollouts of each group go to one of them (the groups take
    turns), the other G - trial_rollouts to the pool as before."""
    from rollout import encode_chat
    plan, prompts = RolloutPlan(chats=[], counts=[], group=[], prompt_id=[]), [p for p in pool if p.in_top_k]
    trial = trial_rollouts if pool.candidates else 0
    for g, problem in enumerate(problems):
        choice = assign_contexts(len(prompts), group_size - trial,
                                 random.Random(infra.seed_for("contexts", seed, step, first + g)))
        uses = [(pool.context(prompts[k]), prompts[k].id, choice.count(k)) for k in sorted(set(choice))]
        if trial:
            child = pool.candidates[(first + g + step) % len(pool.candidates)]
            uses.append((pool.context(child), child.id, trial))
        for context, prompt_id, count in uses:
            plan.chats.append(encode_chat(tok, context.messages(task, problem)))
            plan.counts.append(count)
            plan.group.extend([g] * count)
            plan.prompt_id.extend([prompt_id] * count)
    return plan


# ---------------------------------------------------------------- fast.scoring batch: children tested in RL
# No rollouts of its own: a round (batch_round) only writes children, from the parents' RL rollouts of the
# last T steps; each child then takes trial_rollouts of some groups of the next RL steps, and every step
# (record_batch) adds each context's rewards to the pool's evidence and each child's to its paired test
# (paired_z) against its parent in the same groups. The test accepts a child into the pool, or it leaves.

class StepRollout(NamedTuple):
    """One RL rollout as the fast loop reads it: its problem, context, text and grade."""
    problem: dict
    prompt_id: int            # a pool prompt's id or a candidate's
    text: str
    reward: float
    feedback: str
    step: int


FADED = 0.05                  # evidence whose weight fell below this is dropped


def paired_z(strata: Sequence[dict]) -> float:
    """The child-against-parent test statistic: within each group (stratum) the child's and the parent's
    rewards are exchangeable if the child is no better (same model, same problem, same step), so the
    child's reward sum there has the permutation mean m * mean(all) and variance m n (1 - m/N) s2 / (N - 1)
    (m child and n parent rewards, N = m + n, s2 their variance over N). z = the summed deviations over
    the summed variances' root: about standard normal under that null, stratified so that hard and easy
    problems (and steps, as the weights move) never count as a difference (the CMH idea)."""
    deviation = variance = 0.0
    for stratum in strata:
        child, parent = stratum["child"], stratum["parent"]
        m, n, rewards = len(child), len(parent), [*child, *parent]
        if not m or not n or max(rewards) - min(rewards) < 1e-9:   # no spread: no information (and no
            continue                                                # rounding noise posing as some)
        mean = sum(rewards) / (m + n)
        s2 = sum((x - mean) ** 2 for x in rewards) / (m + n)
        deviation += sum(child) - m * mean
        variance += m * n * s2 / (m + n - 1)
    return deviation / math.sqrt(variance) if variance > 0 else 0.0


def trial_threshold(cfg: FastConfig) -> float:
    """z a child must reach at one of its trial_steps looks: Bonferroni over the looks, so that a child
    no better than its parent passes with probability <= accept_alpha over its whole trial (up to the
    normal approximation; tests/test_batch_scoring.py measures the rate on simulated rewards)."""
    return statistics.NormalDist().inv_cdf(1 - cfg.accept_alpha / cfg.trial_steps)


def evidence_weights(pool: PromptPool, step: int, fade: float) -> dict[str, float]:
    """Each problem's weight in the fronts: fade ** (steps since its rewards were measured)."""
    return {pid: fade ** (step - at) for pid, at in pool.measured_at.items()}


def record_batch(pool: PromptPool, rows: Sequence[StepRollout], step: int, cfg: FastConfig) -> list[dict]:
    """After RL step `step`: its rewards become evidence (each pool prompt's mean reward per problem,
    replacing older evidence on that problem), each child under test gains its strata, stale evidence
    is dropped, and the children are judged. Returns the verdicts [{"id", "operator", "verdict", "z", "step"}]."""
    by_problem: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        by_problem.setdefault(str(row.problem["id"]), {}).setdefault(row.prompt_id, []).append(row.reward)
    for pid, by_prompt in by_problem.items():
        for prompt in pool:
            prompt.scores.pop(pid, None)
            if prompt.id in by_prompt:
                prompt.scores[pid] = sum(by_prompt[prompt.id]) / len(by_prompt[prompt.id])
        pool.measured_at[pid] = step
        for child in pool.candidates:
            if child.id in by_prompt and child.parent_id in by_prompt:
                child.strata.append({"problem": pid, "step": step, "child": by_prompt[child.id],
                                     "parent": by_prompt[child.parent_id]})
    for child in pool.candidates:
        child.steps += any(s["step"] == step for s in child.strata)
    for pid, weight in evidence_weights(pool, step, cfg.evidence_fade).items():
        if weight < FADED:
            del pool.measured_at[pid]
            for prompt in pool:
                prompt.scores.pop(pid, None)
    return judge_candidates(pool, step, cfg)


def judge_candidates(pool: PromptPool, step: int, cfg: FastConfig) -> list[dict]:
    """Each child's test: z >= the threshold joins the pool (scored by its trial rewards, active at once;
    past K active the lowest-ranked other prompt leaves); z <= -threshold fails; trial_steps looks
    without either, or a parent no longer active, ends its candidacy (expired, orphaned)."""
    verdicts, bar = [], trial_threshold(cfg)

    def leaves(child, verdict, z):
        pool.candidates.remove(child)
        verdicts.append({"id": child.id, "operator": child.operator, "verdict": verdict, "z": round(z, 3),
                         "step": step})
    for child in list(pool.candidates):
        z = paired_z(child.strata)
        verdict = ("accepted" if z >= bar else "failed" if z <= -bar
                   else "expired" if child.steps >= cfg.trial_steps else None)
        if verdict:
            leaves(child, verdict, z)
        if verdict == "accepted":
            _admit(pool, child, step, cfg)
    for child in list(pool.candidates):     # an admission may have retired a parent: no test left to run
        if child.parent_id not in pool.prompts:
            leaves(child, "orphaned", paired_z(child.strata))
    return verdicts


def _admit(pool: PromptPool, child: Candidate, step: int, cfg: FastConfig) -> None:
    """An accepted child joins the pool, active, with its trial rewards as its evidence."""
    by_problem: dict[str, list[float]] = {}
    for stratum in child.strata:
        if pool.measured_at.get(stratum["problem"]) == stratum["step"]:     # still the problem's evidence
            by_problem.setdefault(stratum["problem"], []).extend(stratum["child"])
    pool.prompts[child.id] = Prompt(child.id, child.text, child.parent_id, child.born_step, child.operator,
                                    {pid: sum(r) / len(r) for pid, r in by_problem.items()}, in_top_k=True,
                                    demos=[list(d) for d in child.demos])
    cover = pool.coverage(pool.problem_ids(), evidence_weights(pool, step, cfg.evidence_fade))
    others = sorted((p for p in pool if p.id != child.id),
                    key=lambda p: (-cover.get(p.id, 0), -p.mean_score(), p.id))
    pool.retain({child.id, *(p.id for p in others[:cfg.pool_size - 1])})   # K at most: the lowest-ranked leaves
    for p in pool:
        p.in_top_k = True


def batch_round(pool: PromptPool, traces: Sequence[StepRollout], cfg: FastConfig, *, reflect: Reflect, step: int,
                rng, demo_buffer: Sequence = (), task_questions: Sequence[str] = (),
                verdicts: Sequence[dict] = ()) -> dict:
    """fast.scoring batch, every T steps: new children (up to cfg.candidates under test at once) from
    parents drawn on the fronts of the RL evidence, each operator reading the parent's RL rollouts of
    the last T steps (`traces`, its failures first) and the demo buffer; they pass the same guards as a
    round's, and then wait for the RL batches to test them. Nothing is sampled here but reflections.
    Returns the round's stats, as fast_round's (metric_calls 0), with the `verdicts` of the tests that
    ended since the round before counted in: accepted, and failed or expired as rejected not_better."""
    t0, anchors = time.perf_counter(), list({str(t.problem["id"]): t.problem for t in traces}.values())
    ids = [str(p["id"]) for p in anchors]
    seen = dict.fromkeys([*task_questions, *(problem["question"] for problem, _, _ in demo_buffer)])
    r = _Round(cfg=cfg, pool=pool, anchors=anchors, ids=ids, questions=[p["question"] for p in anchors],
               seen_questions=list(seen), stats=_new_stats(step, len(anchors), 0, cfg), evaluate=None,
               reflect=reflect, rng=rng, step=step, budget=0, demo_buffer=demo_buffer,
               size=min(cfg.minibatch, len(anchors)), most=0, front=pool.problem_ids(), judged_on=(),
               weights=evidence_weights(pool, step, cfg.evidence_fade),
               turn=step // cfg.every * cfg.candidates)   # a few draws a round: the operators' turns run on
    for t in sorted(traces, key=lambda t: -t.reward):        # each (context, problem): its worst rollout shown
        r.outputs[t.prompt_id, str(t.problem["id"])] = (t.text, t.reward, t.feedback)
    r.stats["best_score_before"] = pool.best().mean_score()
    wanted = cfg.candidates - len(pool.candidates)
    while wanted > 0 and anchors and r.idle < cfg.patience and not _capped(r):
        draws = [_draw(r) for _ in range(wanted)]
        ready = [d for d in draws if d and not (d.reflection_prompt is None and _reject_if_bad(r, d))]
        _reflect_and_vet(r, ready)
        for d in draws:
            new = d is not None and d.reason is None and d.text is not None and not any(
                d.context(pool.demo_format) == pool.context(c) for c in pool.candidates)
            r.idle = 0 if new else r.idle + 1
            if new:
                pool.candidates.append(Candidate(pool.next_id, d.text, d.parent.id, step, d.operator,
                                                 [list(x) for x in d.context(pool.demo_format).demos]))
                pool.next_id += 1
                wanted -= 1
    for v in verdicts:
        if v["verdict"] == "accepted":
            r.stats["accepted"] += 1
            r.stats["accepted_by_operator"][v["operator"]] = r.stats["accepted_by_operator"].get(v["operator"], 0) + 1
        elif v["verdict"] in ("failed", "expired"):
            r.stats["rejected"]["not_better"] += 1
            r.stats["rejected_by_operator"].setdefault(v["operator"], dict.fromkeys(REJECT_REASONS, 0))["not_better"] += 1
    r.stats.update(scoring="batch", verdicts=list(verdicts), best_score_after=pool.best().mean_score(), pool_size=len(pool),
                   top_k_ids=[p.id for p in pool if p.in_top_k], under_test=[c.id for c in pool.candidates],
                   seconds=time.perf_counter() - t0)
    return r.stats


def _reject_if_bad(r: _Round, proposal: Proposal) -> bool:
    """The guards on a ready-made child (a demo one), as a round's wave applies them."""
    reason = _vet(r, proposal)
    if reason:
        r.reject(proposal, reason)
    return bool(reason)


# ---------------------------------------------------------------- model-backed adapters
def measure_accuracy(model, tok, task, problems, system_prompt, *, k=4, max_new_tokens, temperature,
                     top_p=1.0, generator=None, use_adapter=True, stop=(), batch_size=None, max_rows=None,
                     dist=None) -> dict:
    """k samples per problem in one rollout.sample call (in waves of max_rows samples). mean@k = mean reward over all
    n*k samples; accuracy = fraction of those samples with reward >= 1 (differs from mean@k when a
    task gives partial credit, e.g. arithmetic's format_reward); pass@k = fraction of problems with
    at least one sample of reward >= 1. Under torchrun (dist, an infra.Dist) each rank samples its
    slice of the problems and every rank returns the numbers over all of them. Training's validation and
    eval.py (as eval.evaluate) both measure with it."""
    import rewards
    import rollout                                   # lazy: the core above needs no model stack
    dist = dist or infra.Dist()
    if not problems:
        return {"mean_at_k": float("nan"), "accuracy": float("nan"), "pass_at_k": float("nan"), "n": 0, "k": k}
    mine = dist.shard(list(range(len(problems))))
    scored = []  # (problem index, reward) of every sample this rank drew
    if mine:
        context = as_context(system_prompt)  # a plain prompt, or instruction + worked examples
        prompts = [rollout.encode_chat(tok, context.messages(task, problems[i])) for i in mine]
        with rollout.weights(model, use_adapter):  # rollout.sample runs in eval mode and restores the model's mode
            ro = rollout.sample(model, tok, prompts, [k] * len(prompts), max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stop=list(stop),
                                generator=generator, batch_size=batch_size, max_rows=max_rows)
        scored = [(mine[j], rewards.score_completion(task, problems[mine[j]], text)[0])
                  for j, text in zip(ro.prompt_index, ro.texts)]
    scored = dist.gather(scored)
    reward = [r for _, r in scored]
    solved = {i for i, r in scored if r >= 1.0}
    return {"mean_at_k": sum(reward) / len(reward), "accuracy": sum(r >= 1.0 for r in reward) / len(reward),
            "pass_at_k": len(solved) / len(problems), "n": len(problems), "k": k}


def make_evaluate(model, tokenizer, task, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, stop=(), generator=None, max_rows: int | None = None) -> Evaluate:
    """evaluate() for fast_round: all pairs in ONE rollout.sample call, graded by the task. Sample as
    the RL rollouts are sampled (the same max_new_tokens, temperature, top_p and stop strings), or a
    prompt's score would measure another policy than the one RL trains."""
    import rewards
    import rollout                                   # lazy: the core above needs no model stack

    def evaluate(contexts: list[Context | str], problems: list[dict]) -> list[tuple[str, float, str]]:
        # Identical (context, problem) pairs become one chat prompt with a count: one prefill, its KV
        # cache repeated, instead of prefilling the same tokens again.
        contexts = [as_context(c) for c in contexts]
        distinct: dict[tuple[Context, str], list] = {}           # key -> [context, problem, count]
        for context, problem in zip(contexts, problems, strict=True):
            distinct.setdefault((context, str(problem["id"])), [context, problem, 0])[2] += 1
        entries = list(distinct.values())
        chats = [rollout.encode_chat(tokenizer, context.messages(task, problem)) for context, problem, _ in entries]
        out = rollout.sample(model, tokenizer, chats, [count for _, _, count in entries],
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop=list(stop), generator=generator, max_rows=max_rows)
        samples: list[list[tuple[str, Sampled]]] = [[] for _ in entries]
        for row, index in enumerate(out.prompt_index):
            samples[index].append((out.texts[row], Sampled(out.prompt_ids[row], out.completion_ids[row],
                                                           out.logprobs[row], out.finish_reasons[row])))
        pending = {key: iter(rows) for key, rows in zip(distinct, samples)}
        results = []
        for context, problem in zip(contexts, problems):
            completion, sampled = next(pending[context, str(problem["id"])])
            results.append(Scored(completion, *rewards.score_completion(task, problem, completion), sampled))
        return results

    return evaluate


def make_reflector(model, tokenizer, *, use_adapter: bool, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, generator=None, reply_format: ReplyFormat = "fenced") -> Reflect:
    """reflect() for fast_round: the same model in the same process, every prompt of a wave in ONE
    rollout.sample call. use_adapter=False runs under peft's disable_adapter() (rollout.weights), i.e.
    the frozen base model critiques (a frozen reflector at no extra memory); a model without that
    context manager (no LoRA) just runs as it is.

    reply_format "fenced": the assistant turn starts with an opening fence (encoded after the
    generation prompt) and sampling stops at the closing one, so the reply IS the new prompt: no
    tokens go to commentary and a small model cannot forget to close the block. A reply that ends
    with EOS is closed for it; one cut off by max_new_tokens stays open (rejected as no_fence). The
    returned text puts the opening fence back, so the guards see one fenced block as usual.
    "paragraph": as fenced, and a blank line ends the block too: the new instruction is one paragraph
    (the worked reflection's is), and a small model's rambling after it never reaches the guards.
    "free": the plain reply, for a strong reflector that reasons before it writes the block."""
    import rollout

    if reply_format not in REPLY_FORMATS:
        raise ValueError(f"reply_format must be one of {REPLY_FORMATS}, got {reply_format!r}")
    fenced = reply_format in ("fenced", "paragraph")
    stop = {"fenced": [FENCE], "paragraph": [FENCE, "\n\n"], "free": []}[reply_format]
    opening = f"{FENCE}\n"
    prefix = tokenizer.encode(opening, add_special_tokens=False) if fenced else []

    def reflect(prompts: list[list[dict] | str]) -> list[Reflection]:
        chats = [rollout.encode_chat(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
                 + prefix for p in prompts]
        with rollout.weights(model, use_adapter):
            out = rollout.sample(model, tokenizer, chats, [1] * len(chats), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, stop=stop,
                                 generator=generator)
        replies: list[Reflection | None] = [None] * len(prompts)
        for index, text, tokens, finish in zip(out.prompt_index, out.texts, out.completion_ids,
                                               out.finish_reasons, strict=True):
            if fenced:  # closed by EOS or a blank line: close the block for it (cut off: left open)
                closed = finish == "eos" or (reply_format == "paragraph" and finish == "stop"
                                             and not text.rstrip().endswith(FENCE))
                text = opening + (text.rstrip() + f"\n{FENCE}" if closed else text)
            replies[index] = Reflection(text, len(tokens))
        return replies

    return reflect


def as_prefilled(reply: str, finish_reason: str, reply_format: ReplyFormat) -> str:
    """An endpoint's reply as make_reflector would have returned it. A chat endpoint cannot, in general,
    continue an assistant turn we start (vLLM and llama-server can, each its own way; a hosted model
    cannot), so the opening fence is not pre-filled and the format's stop strings are not sent (the
    fence that ends the block would stop a reply at the fence that opens it). Instead the reply is read
    from just after its first opening fence (from its start when it writes none: a pre-filled reply
    starts inside the block) and cut here at the format's first stop string, then closed as
    make_reflector closes it: at a stop string or when the model ended the reply ("stop"), left open
    when max tokens cut it ("length": rejected as no_fence). A blank line right after the fence is
    skipped: a pre-filled reply never starts there. The tokens are the whole reply's: what was paid for."""
    if reply_format == "free":
        return reply
    opening = re.search(rf"{FENCE}[^\n`]*\n", reply)
    body = (reply[opening.end():] if opening else reply).lstrip("\n")
    stops = [at for s in ([FENCE, "\n\n"] if reply_format == "paragraph" else [FENCE]) if (at := body.find(s)) >= 0]
    closed = bool(stops) or finish_reason == "stop"
    body = body[:min(stops)] if stops else body
    return f"{FENCE}\n" + (body.rstrip() + f"\n{FENCE}" if closed else body)


def make_endpoint_reflector(endpoint: infra.ChatEndpoint, *, max_new_tokens: int, temperature: float = 1.0,
                            top_p: float = 1.0, reply_format: ReplyFormat = "fenced") -> Reflect:
    """reflect() for fast_round from a model behind an OpenAI-compatible endpoint (fast.reflector:
    openai:<model>): the chat make_reflector encodes (the worked reflection turn, then the request), with
    the same max tokens, temperature and top_p; a wave's prompts go out at once (endpoint.max_in_flight at
    most), and each reply is read as a pre-filled one would be (as_prefilled), so the guards see what
    they see from make_reflector. A call that fails after its retries is a Reflection with its error."""
    if reply_format not in REPLY_FORMATS:
        raise ValueError(f"reply_format must be one of {REPLY_FORMATS}, got {reply_format!r}")

    def reflect(prompts: list[list[dict] | str]) -> list[Reflection]:
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        replies = endpoint.complete_many(chats, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        return [Reflection("" if reply.error else as_prefilled(reply.text, reply.finish_reason, reply_format),
                           reply.tokens, reply.seconds, reply.model, reply.error) for reply in replies]

    return reflect


def load_reflector(fast: FastConfig, model_cfg, device):
    """What fast.reflector names, made once at start-up (fst.start_run): None for base and policy (the
    policy model itself reflects), an infra.ChatEndpoint for openai:<model> (infra.start_up has probed
    it), else (model, tokenizer) of another causal LM, frozen."""
    if fast.reflector in ("base", "policy"):
        return None
    if fast.reflector.startswith(infra.ENDPOINT_PREFIX):
        return infra.reflector_endpoint(fast)
    return infra.load_frozen_model(fast.reflector, model_cfg, device)


def reflector_for(fast: FastConfig, loaded, model, tokenizer, generator=None) -> Reflect:
    """A round's reflect(): the endpoint's, or the in-process one on `loaded` (load_reflector's frozen
    model), else on the policy `model` (adapter off for base, on for policy)."""
    settings = dict(max_new_tokens=fast.reflector_max_new_tokens, temperature=fast.reflector_temperature,
                    top_p=fast.reflector_top_p, reply_format=fast.reflector_format)
    if isinstance(loaded, infra.ChatEndpoint):
        return make_endpoint_reflector(loaded, **settings)
    return make_reflector(*(loaded or (model, tokenizer)), use_adapter=fast.reflector == "policy",
                          generator=generator, **settings)
