"""context_opt.py -- the fast weights: keep and improve a small Pareto pool of system prompts.

Every T RL steps `fast_round` re-scores the pool on a fresh anchor set, proposes children of
Pareto-sampled parents in waves of several at once, guards against malformed proposals, and keeps a
child only if it strictly beats its parent, re-run beside it, on a minibatch. The children come from
operators, functions registered with @operator (GEPA-style reflective mutation, a bootstrapped worked
example): a new operator is one more such function.
The core is model-free: it calls two plain callables, `evaluate` and `reflect`. The thin adapters at
the bottom (make_evaluate, make_reflector) bind them to a model through rollout.py and rewards.py.
"""
from __future__ import annotations

import json
import os
import re
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import infra

PERFECT = 1.0        # rewards live in [0, 1]; a prompt at 1.0 on a problem has nothing to learn there
REJECT_REASONS = ("empty", "no_fence", "too_long", "thinking", "same_as_parent", "copies_anchor",
                  "not_better")
ReplyFormat = Literal["fenced", "free"]   # the reflector's reply: starts inside the block, or free-form
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
    reflector: Literal["base", "policy"] = "base"  # base = adapter off (frozen critic)
    # proposal operators, taken in turn: names registered with @operator in context_opt.py (reflect, demo, ...)
    operators: list[str] = field(default_factory=lambda: ["reflect"])
    demo_buffer: int = 256  # rewarded RL rollouts kept as candidate worked examples (demo operator)
    max_prompt_chars: int = 4000
    reflector_max_new_tokens: int = 1024
    reflector_temperature: float = 0.7
    reflector_top_p: float = 0.95
    reflector_format: ReplyFormat = "fenced"  # fenced: reply starts in the block, stops at its end
    wave: int = 4  # children proposed at once (reflections and scoring batched); 1 = one at a time
    rescore_parent: bool = True  # judge a child against a fresh rollout of its parent (fair); false = reuse
    max_proposals: int = 0  # end a round after this many proposals (0 = only budget and patience end it)
    patience: int = 10  # end a round after this many draws in a row that spend nothing (skips, guard rejections)

    ranges = {"every": ">= 1", "pool_size": ">= 1", "budget": "> 0", "minibatch": ">= 1", "wave": ">= 1",
              "max_proposals": ">= 0", "patience": ">= 1",
              "demo_buffer": ">= 1",  # the buffer keeps its last N entries: N = 0 would keep them all
              "max_prompt_chars": ">= 1", "reflector_max_new_tokens": ">= 1",
              "reflector_temperature": ">= 0", "reflector_top_p": "(0, 1]"}

    def check(self, prefix: str = "") -> None:
        """What `ranges` cannot say: at least one operator, every one a registered one."""
        if not self.operators:
            raise infra.ConfigError(f"config key '{prefix}operators' must name at least one of {list(OPERATORS)}")
        for i, name in enumerate(self.operators):
            if name not in OPERATORS:
                raise infra.ConfigError(
                    f"config key '{prefix}operators[{i}]' must be one of {list(OPERATORS)}, got {name!r}")


@dataclass
class Prompt:
    id: int
    text: str
    parent_id: int | None
    born_step: int
    operator: str                                              # "seed" | "reflect" | "demo"
    scores: dict[str, float] = field(default_factory=dict)    # problem id -> reward, current anchors
    in_top_k: bool = False

    def mean_score(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else float("-inf")


def dominates(a: Prompt, b: Prompt, problem_ids: Sequence[str]) -> bool:
    """a >= b on every problem and > on one; a missing score counts as minus infinity."""
    sa = [a.scores.get(pid, float("-inf")) for pid in problem_ids]
    sb = [b.scores.get(pid, float("-inf")) for pid in problem_ids]
    return all(x >= y for x, y in zip(sa, sb)) and any(x > y for x, y in zip(sa, sb))


class PromptPool:
    """The live prompts. Scores always refer to the current anchor set: re-scoring replaces them."""

    def __init__(self, seed_text: str | None = None):
        self.prompts: dict[int, Prompt] = {}
        self.next_id = 0
        if seed_text is not None:
            self.add(seed_text, parent_id=None, step=0, operator="seed").in_top_k = True

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(list(self.prompts.values()))

    def __getitem__(self, prompt_id: int) -> Prompt:
        return self.prompts[prompt_id]

    def add(self, text: str, *, parent_id: int | None, step: int, operator: str,
            scores: dict[str, float] | None = None) -> Prompt:
        prompt = Prompt(self.next_id, text, parent_id, step, operator, dict(scores or {}))
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

    def coverage(self, problem_ids: Sequence[str] | None = None) -> dict[int, int]:
        """Non-dominated prompt id -> number of problems on whose front it stands. A dominator stands
        on every front its dominated prompt stands on, so dropping dominated ones changes no front."""
        front = self.pareto_front(problem_ids)
        return {p.id: sum(p.id in ids for ids in front.values()) for p in self.nondominated(problem_ids)}

    def sample_parent(self, rng, problem_ids: Sequence[str] | None = None) -> Prompt:
        """A non-dominated prompt, drawn with probability proportional to its front coverage."""
        cover = self.coverage(problem_ids)
        ids = list(cover)
        if not any(cover.values()):                  # nothing scored yet: every prompt is as good
            return self.prompts[rng.choice(ids)]
        return self.prompts[rng.choices(ids, weights=[cover[i] for i in ids])[0]]

    def top_k(self, k: int, problem_ids: Sequence[str] | None = None) -> list[Prompt]:
        """The K prompts RL samples with: non-dominated, ranked by coverage, then mean score, then age."""
        cover = self.coverage(problem_ids)
        ranked = sorted(cover, key=lambda i: (-cover[i], -self.prompts[i].mean_score(), i))[:k]
        for p in self.prompts.values():
            p.in_top_k = p.id in ranked
        return [self.prompts[i] for i in ranked]

    def active_texts(self) -> list[str]:
        return [p.text for p in self.prompts.values() if p.in_top_k] or [p.text for p in self.prompts.values()]

    def best(self) -> Prompt:
        return max(self.prompts.values(), key=lambda p: (p.mean_score(), -p.id))

    def to_json(self) -> dict:
        return {"next_id": self.next_id, "prompts": [asdict(p) for p in self.prompts.values()]}

    @classmethod
    def from_json(cls, data: dict) -> PromptPool:
        pool = cls()
        pool.prompts = {d["id"]: Prompt(**d) for d in data["prompts"]}
        pool.next_id = data["next_id"]
        return pool

    def save(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp")                    # write then rename: a crash never leaves half a file
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> PromptPool:
        return cls.from_json(json.loads(Path(path).read_text()))


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
    # Only a copy the child INTRODUCES counts: problems recur across epochs, and a parent that already
    # holds one (an old demo) must not make every child of its lineage unacceptable.
    if any(copies_text(text, q) and not copies_text(parent_text, q) for q in anchor_questions):
        return "copies_anchor"
    return None


def vet_reflection(reflector_output: str, parent_text: str, anchor_questions: Sequence[str],
                   max_chars: int) -> tuple[str | None, str | None]:
    """Raw reflector text -> (candidate prompt, None) or (None, rejection reason)."""
    if not reflector_output.strip():
        return None, "empty"
    text = extract_prompt(reflector_output)
    if text is None:
        return None, "no_fence"
    reason = check_proposal(text, parent_text, anchor_questions, max_chars)
    return (None, reason) if reason else (text, None)


# ---------------------------------------------------------------- operators
@dataclass(kw_only=True)
class Proposal:
    """One child of a wave, from its parent's draw to the acceptance test. An operator returns it with
    exactly one of `text` (a ready candidate: the guards check it at once) and `reflection_prompt`
    (the wave's one reflect call writes the candidate from it, then the guards check that)."""
    parent: Prompt
    batch: list[int]                    # anchor indices of its minibatch
    text: str | None = None             # the candidate prompt, once built and vetted
    reflection_prompt: str | None = None  # what the reflector reads, for a child the reflector writes
    operator: str = ""                  # the name it was registered under (set by _draw)
    reason: str | None = None           # why it was rejected, if it was

    @property
    def scored(self) -> bool:
        """Did it pass the guards (and so spend budget on its minibatch)?"""
        return self.text is not None and self.reason in (None, "not_better")


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


def build_reflection_prompt(parent_text: str, examples: Sequence[dict]) -> str:
    """examples: dicts with question, output (the model's full response), reward, feedback."""
    shown = "\n\n".join(
        f"### Attempt {n}\nProblem:\n{ex['question']}\n\nAssistant's full response:\n{ex['output']}\n\n"
        f"Reward: {ex['reward']:.2f}\nGrader feedback: {ex['feedback']}"
        for n, ex in enumerate(examples, 1))
    return (
        "You maintain the system prompt of an AI assistant. Below are its current system prompt and a "
        "few of its graded attempts made with that prompt, each with the grader's feedback.\n\n"
        f"## Current system prompt\n```\n{parent_text}\n```\n\n## Graded attempts\n{shown}\n\n"
        "## Your task\n"
        "1. Work out what went wrong in the low-reward attempts and what the good ones did right.\n"
        "2. Edit the system prompt INCREMENTALLY: keep every instruction that still helps, and add the "
        "facts, rules, checks and strategies that the feedback reveals, so the assistant gets this kind "
        "of problem right next time (including the exact answer format the grader expects).\n"
        "3. Write general guidance that carries over to new problems of this kind. Do not include the "
        "answers to these particular problems and do not copy their text.\n"
        "4. Stay concise; put no commentary inside the prompt.\n\n"
        "Reply with the complete new system prompt inside ONE fenced block (``` ... ```), "
        "and put nothing after the block.")


@operator("reflect")
def reflective_mutation(r: _Round, parent: Prompt, batch: list[int]) -> Proposal:
    """GEPA's reflective mutation: the reflector reads the parent and its graded attempts on the
    minibatch (its rollouts of this round) and rewrites it."""
    examples = [{"question": r.questions[i], "output": r.outputs[parent.id, r.ids[i]][0],
                 "reward": r.outputs[parent.id, r.ids[i]][1], "feedback": r.outputs[parent.id, r.ids[i]][2]}
                for i in batch]
    return Proposal(parent=parent, batch=batch, reflection_prompt=build_reflection_prompt(parent.text, examples))


def make_demo(parent_text: str, demo_buffer: Sequence[tuple[dict, str, float]], anchor_ids: set[str],
              rng) -> str | None:
    """Bootstrapped few-shot: the parent plus one of the policy's own best-rewarded past solutions,
    never an anchor problem (that would leak the answer into the set it is judged on), never one the
    parent already shows. demo_buffer holds (problem, completion, reward) from earlier RL rollouts."""
    fresh = []
    for problem, completion, reward in demo_buffer:
        question = problem["question"]
        if reward > 0 and str(problem["id"]) not in anchor_ids and question not in parent_text:
            fresh.append((reward, question, completion))
    if not fresh:
        return None
    top = max(r for r, _, _ in fresh)
    _, question, completion = rng.choice([d for d in fresh if d[0] == top])
    return f"{parent_text.rstrip()}\n\nExample:\nProblem: {question}\nSolution: {completion.strip()}"


@operator("demo", skip="no_demo")
def worked_example(r: _Round, parent: Prompt, batch: list[int]) -> Proposal | None:
    """The parent plus a worked example (make_demo); a skip when the buffer has none left to add."""
    started = time.perf_counter()
    text = make_demo(parent.text, r.demo_buffer, set(r.ids), r.rng)
    r.stats["seconds_demo"] += time.perf_counter() - started
    return None if text is None else Proposal(parent=parent, batch=batch, text=text)


def _failures_first(parent: Prompt, problem_ids: list[str], size: int, rng) -> list[int] | None:
    """Indices of a minibatch: the parent's failures (in random order) first, then the rest;
    None when the parent is perfect everywhere, since then no child can strictly beat it."""
    order = list(range(len(problem_ids)))
    rng.shuffle(order)
    order.sort(key=lambda i: parent.scores[problem_ids[i]] >= PERFECT)   # stable: keeps the shuffle
    return None if parent.scores[problem_ids[order[0]]] >= PERFECT else order[:size]


# ---------------------------------------------------------------- one fast round
Evaluate = Callable[[list[str], list[dict]], list[tuple[str, float, str]]]


class Reflection(NamedTuple):
    """One reply of the reflector: its text and the tokens generated for it. A reflect() callable may
    return plain strings instead (a scripted reflector generates no tokens)."""
    text: str
    tokens: int = 0


Reflect = Callable[[list[str]], list["Reflection | str"]]


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
    scoring_calls: int = 0              # metric calls scoring the live pool: not charged to the budget
    turn: int = 0                       # draws so far: picks the next operator
    idle: int = 0                       # consecutive draws that spent nothing

    def spent(self) -> int:
        """Metric calls charged to the budget so far."""
        return self.stats["metric_calls"] - self.scoring_calls

    def run(self, texts: list[str], problems: list[dict]) -> list[tuple[str, float, str]]:
        """evaluate() on aligned (prompt, problem) pairs, timed and counted; no call for no pairs."""
        if not texts:
            return []
        started = time.perf_counter()
        results = self.evaluate(texts, problems)
        self.stats["seconds_scoring"] += time.perf_counter() - started
        if len(results) != len(texts):
            raise ValueError(f"evaluate returned {len(results)} results for {len(texts)} pairs")
        self.stats["metric_calls"] += len(texts)
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
    skips = ["perfect_parent", *(OPERATORS[op].skip for op in operators if OPERATORS[op].skip)]
    return {"step": step, "anchor_size": anchor_size, "budget": budget, "wave": cfg.wave, "metric_calls": 0,
            "waves": 0, "proposals": 0, "accepted": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0),
            "rejected_by_operator": {op: dict.fromkeys(REJECT_REASONS, 0) for op in operators},
            "skipped": dict.fromkeys(skips, 0), "proposals_by_operator": dict.fromkeys(operators, 0),
            "accepted_by_operator": dict.fromkeys(operators, 0), "accepted_prompts": [],
            "seconds_reflecting": 0.0, "seconds_scoring": 0.0, "seconds_demo": 0.0, "reflector_tokens": 0}


def _score_live_pool(r: _Round) -> None:
    """Step 2 of the round: the prompts RL used since the last round, on every anchor. Survivors
    outside the top K are dropped here, since their scores belong to an old anchor set and re-scoring
    them all would eat the whole budget."""
    live = [p for p in r.pool if p.in_top_k] or list(r.pool)
    r.pool.retain({p.id for p in live})
    everything = list(range(len(r.anchors)))
    results = r.run([p.text for p in live for _ in r.anchors], r.anchors * len(live))
    for n, prompt in enumerate(live):
        prompt.scores = {}
        r.record(prompt, everything, results[n * len(r.anchors):(n + 1) * len(r.anchors)])
    r.stats["best_score_before"] = r.pool.best().mean_score()
    r.stats["mean_score_before"] = sum(p.mean_score() for p in live) / len(live)
    r.scoring_calls = r.stats["metric_calls"]


def _draw(r: _Round) -> Proposal | None:
    """One draw: parent, operator (cfg.operators in turn), minibatch, then the operator's proposal;
    None for a skip (a parent perfect everywhere, or an operator with nothing to propose)."""
    parent = r.pool.sample_parent(r.rng, r.ids)
    name = r.cfg.operators[r.turn % len(r.cfg.operators)]
    r.turn += 1
    batch = _failures_first(parent, r.ids, r.size, r.rng)
    if batch is None:
        r.stats["skipped"]["perfect_parent"] += 1
        return None
    op = OPERATORS[name]
    proposal = op.propose(r, parent, batch)
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
        if proposal.reflection_prompt is None and (reason := check_proposal(
                proposal.text, proposal.parent.text, r.questions, r.cfg.max_prompt_chars)):
            r.reject(proposal, reason)
            run_idle += 1
            continue
        new_pairs = ({(proposal.parent.id, i) for i in proposal.batch} - fresh_pairs if r.cfg.rescore_parent
                     else set())
        reserved += r.size + len(new_pairs)
        fresh_pairs |= new_pairs
        run_idle = 0                            # it may spend; the real count comes after scoring
    return draws


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
        proposal.text, reason = vet_reflection(reply.text, proposal.parent.text, r.questions,
                                               r.cfg.max_prompt_chars)
        if reason:
            r.reject(proposal, reason)


def _score_children(r: _Round, trying: list[Proposal]) -> tuple[list, dict[tuple[int, int], float]]:
    """Every surviving child on its minibatch, then (rescore_parent) each parent afresh, once per
    problem its children are judged on, all in one evaluate call. Returns the children's results
    (concatenated in `trying` order) and the parents' fresh rewards by (parent id, anchor index)."""
    if unready := [p.operator for p in trying if p.text is None]:
        raise RuntimeError(f"proposals of operators {unready} reached scoring without a candidate text")
    child_pairs = [(p.text, i) for p in trying for i in p.batch]
    parent_pairs = (list(dict.fromkeys((p.parent.id, i) for p in trying for i in p.batch))
                    if r.cfg.rescore_parent else [])
    pairs = child_pairs + [(r.pool[pid].text, i) for pid, i in parent_pairs]
    results = r.run([text for text, _ in pairs], [r.anchors[i] for _, i in pairs])
    fresh = {pair: result[1] for pair, result in zip(parent_pairs, results[len(child_pairs):], strict=True)}
    return results[:len(child_pairs)], fresh


def _accept(r: _Round, trying: list[Proposal], child_results: list,
            fresh: dict[tuple[int, int], float]) -> list[tuple[Prompt, list[int]]]:
    """Each child against its own parent, strictly; the accepted ones join the pool. Returns each
    accepted child with the anchor indices it still has to be scored on."""
    accepted: list[tuple[Prompt, list[int]]] = []
    at = 0
    for proposal in trying:
        results, at = child_results[at:at + len(proposal.batch)], at + len(proposal.batch)
        parent = proposal.parent
        parent_sum = (sum(fresh[parent.id, i] for i in proposal.batch) if r.cfg.rescore_parent
                      else sum(parent.scores[r.ids[i]] for i in proposal.batch))
        if sum(reward for _, reward, _ in results) <= parent_sum:
            r.reject(proposal, "not_better")
            continue
        child = r.pool.add(proposal.text, parent_id=parent.id, step=r.step, operator=proposal.operator)
        r.record(child, proposal.batch, results)
        accepted.append((child, [i for i in range(len(r.anchors)) if i not in proposal.batch]))
        r.stats["accepted"] += 1
        r.stats["accepted_by_operator"][proposal.operator] += 1
        r.stats["accepted_prompts"].append(proposal.text)
    return accepted


def _score_rest(r: _Round, accepted: list[tuple[Prompt, list[int]]]) -> None:
    """The accepted children on the rest of the anchors, in one call."""
    results = r.run([child.text for child, rest in accepted for _ in rest],
                    [r.anchors[i] for _, rest in accepted for i in rest])
    at = 0
    for child, rest in accepted:
        r.record(child, rest, results[at:at + len(rest)])
        at += len(rest)


def _finish(r: _Round, started: float) -> dict:
    """Prune the pool to its Pareto front, mark the top K (cfg.pool_size) active, and close the stats."""
    r.pool.retain({p.id for p in r.pool.nondominated(r.ids)})
    active = r.pool.top_k(r.cfg.pool_size, r.ids)
    r.stats.update(best_score_after=r.pool.best().mean_score(),
                   mean_score_after=sum(p.mean_score() for p in active) / len(active),
                   pool_size=len(r.pool), top_k_ids=[p.id for p in active],
                   seconds=time.perf_counter() - started)
    return r.stats


def fast_round(pool: PromptPool, anchor_problems: Sequence[dict], cfg: FastConfig, *, evaluate: Evaluate,
               reflect: Reflect, step: int, rng, demo_buffer: Sequence = ()) -> dict:
    """Improve the pool in place on this round's anchor set, as `cfg` (the config's `fast` section)
    says; return stats.

    evaluate(prompt_texts, problems) scores aligned (prompt, problem) pairs, one rollout each, in one
    batched call -> [(completion, reward, feedback)]. reflect(prompts) -> one reply per reflection
    prompt (a Reflection or a str), all generated in one batched call. Problems are dicts with an
    "id" and a "question"; demo_buffer holds (problem, completion, reward) of earlier RL rollouts.

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
    child is always scored on the rest of the anchors, so metric_calls <= L * len(anchors) + budget
    + wave * (len(anchors) - minibatch). cfg.patience consecutive draws that spend nothing (skips,
    guard rejections; counted in draw order, checked between waves) end the round: reflecting costs
    time too. cfg.max_proposals > 0 also ends it after that many proposals (skips are not proposals),
    so that two rounds can be compared at equal work (bench/fast_round.py). At the end the pool keeps
    its Pareto front, and its top cfg.pool_size prompts are marked for RL.
    """
    if unknown := set(cfg.operators) - set(OPERATORS):
        raise ValueError(f"unknown operators {sorted(unknown)}; known: {list(OPERATORS)}")
    if not anchor_problems:
        raise ValueError("fast_round needs at least one anchor problem")
    if cfg.wave < 1:
        raise ValueError(f"wave must be >= 1, got {cfg.wave}")
    if cfg.max_proposals < 0:
        raise ValueError(f"max_proposals must be >= 0 (0 = no cap), got {cfg.max_proposals}")
    t0 = time.perf_counter()
    anchors = list(anchor_problems)
    budget = int(cfg.budget * len(anchors))
    size = min(cfg.minibatch, len(anchors))
    r = _Round(cfg=cfg, pool=pool, anchors=anchors, ids=[str(p["id"]) for p in anchors],
               questions=[p["question"] for p in anchors], stats=_new_stats(step, len(anchors), budget, cfg),
               evaluate=evaluate, reflect=reflect, rng=rng, step=step, budget=budget, demo_buffer=demo_buffer,
               size=size, most=size * (2 if cfg.rescore_parent else 1))
    _score_live_pool(r)
    while r.spent() + r.most <= budget and r.idle < cfg.patience and not _capped(r):
        draws = _draw_wave(r)
        proposals = [d for d in draws if d]
        if proposals:
            r.stats["waves"] += 1
        _reflect_and_vet(r, proposals)
        trying = [p for p in proposals if p.reason is None]
        child_results, fresh = _score_children(r, trying)
        _score_rest(r, _accept(r, trying, child_results, fresh))
        for draw in draws:                      # patience, in draw order
            r.idle = 0 if draw is not None and draw.scored else r.idle + 1
    return _finish(r, t0)


# ---------------------------------------------------------------- model-backed adapters
def make_evaluate(model, tokenizer, task, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, stop=(), generator=None) -> Evaluate:
    """evaluate() for fast_round: all pairs in ONE rollout.sample call, graded by the task. Sample as
    the RL rollouts are sampled (the same max_new_tokens, temperature, top_p and stop strings), or a
    prompt's score would measure another policy than the one RL trains."""
    import rewards
    import rollout                                   # lazy: the core above needs no model stack

    def evaluate(prompt_texts: list[str], problems: list[dict]) -> list[tuple[str, float, str]]:
        # Identical (prompt, problem) pairs become one chat prompt with a count: one prefill, its KV
        # cache repeated, instead of prefilling the same tokens again.
        distinct: dict[tuple[str, str], list] = {}               # key -> [prompt text, problem, count]
        for text, problem in zip(prompt_texts, problems, strict=True):
            distinct.setdefault((text, str(problem["id"])), [text, problem, 0])[2] += 1
        entries = list(distinct.values())
        chats = [rollout.encode_chat(tokenizer, task.messages(problem, text)) for text, problem, _ in entries]
        out = rollout.sample(model, tokenizer, chats, [count for _, _, count in entries],
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop=list(stop), generator=generator)
        completions: list[list[str]] = [[] for _ in entries]
        for index, completion in zip(out.prompt_index, out.texts, strict=True):
            completions[index].append(completion)
        pending = {key: iter(texts) for key, texts in zip(distinct, completions)}
        results = []
        for text, problem in zip(prompt_texts, problems):
            completion = next(pending[text, str(problem["id"])])
            results.append((completion, *rewards.score_completion(task, problem, completion)))
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
    "free": the plain reply, for a strong reflector that reasons before it writes the block."""
    import rollout

    if reply_format not in REPLY_FORMATS:
        raise ValueError(f"reply_format must be one of {REPLY_FORMATS}, got {reply_format!r}")
    fenced = reply_format == "fenced"
    opening = f"{FENCE}\n"
    prefix = tokenizer.encode(opening, add_special_tokens=False) if fenced else []

    def reflect(prompts: list[str]) -> list[Reflection]:
        chats = [rollout.encode_chat(tokenizer, [{"role": "user", "content": p}]) + prefix for p in prompts]
        with rollout.weights(model, use_adapter):
            out = rollout.sample(model, tokenizer, chats, [1] * len(chats), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, stop=[FENCE] if fenced else [],
                                 generator=generator)
        replies: list[Reflection | None] = [None] * len(prompts)
        for index, text, tokens, finish in zip(out.prompt_index, out.texts, out.completion_ids,
                                               out.finish_reasons, strict=True):
            if fenced:
                text = opening + text + (f"\n{FENCE}" if finish == "eos" else "")
            replies[index] = Reflection(text, len(tokens))
        return replies

    return reflect
