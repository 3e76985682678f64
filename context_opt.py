"""context_opt.py -- the fast weights: keep and improve a small Pareto pool of system prompts.

Every T RL steps `fast_round` re-scores the pool on a fresh anchor set, proposes children of
Pareto-sampled parents (GEPA-style reflective mutation, or a bootstrapped worked example), guards
against malformed proposals, and keeps a child only if it strictly beats its parent on a minibatch.
The core is model-free: it calls two plain callables, `evaluate` and `reflect`. The thin adapters at
the bottom (make_evaluate, make_reflector) bind them to a model through rollout.py and rewards.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

PERFECT = 1.0        # rewards live in [0, 1]; a prompt at 1.0 on a problem has nothing to learn there
OPERATORS = ("reflect", "demo")
REJECT_REASONS = ("empty", "no_fence", "too_long", "thinking", "same_as_parent", "copies_anchor",
                  "not_better")
SKIP_REASONS = ("perfect_parent", "no_demo")
COPY_NGRAM = 8       # words per n-gram when looking for an anchor question pasted into a prompt
COPY_FRACTION = 0.5  # share of a question's n-grams found in the prompt that counts as a copy


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


# ---------------------------------------------------------------- the two operators
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


def make_demo(parent_text: str, demo_buffer: Sequence[tuple[dict, str, float]], anchor_ids: set[str],
              rng, problem_text: Callable[[dict], str]) -> str | None:
    """Bootstrapped few-shot: the parent plus one of the policy's own best-rewarded past solutions,
    never an anchor problem (that would leak the answer into the set it is judged on), never one the
    parent already shows. demo_buffer holds (problem, completion, reward) from earlier RL rollouts."""
    fresh = []
    for problem, completion, reward in demo_buffer:
        question = problem_text(problem)
        if reward > 0 and str(problem["id"]) not in anchor_ids and question not in parent_text:
            fresh.append((reward, question, completion))
    if not fresh:
        return None
    top = max(r for r, _, _ in fresh)
    _, question, completion = rng.choice([d for d in fresh if d[0] == top])
    return f"{parent_text.rstrip()}\n\nExample:\nProblem: {question}\nSolution: {completion.strip()}"


def _failures_first(parent: Prompt, problem_ids: list[str], size: int, rng) -> list[int] | None:
    """Indices of a minibatch: the parent's failures (in random order) first, then the rest;
    None when the parent is perfect everywhere, since then no child can strictly beat it."""
    order = list(range(len(problem_ids)))
    rng.shuffle(order)
    order.sort(key=lambda i: parent.scores[problem_ids[i]] >= PERFECT)   # stable: keeps the shuffle
    return None if parent.scores[problem_ids[order[0]]] >= PERFECT else order[:size]


# ---------------------------------------------------------------- one fast round
Evaluate = Callable[[list[str], list[dict]], list[tuple[str, float, str]]]


def fast_round(pool: PromptPool, anchor_problems: Sequence[dict], *, evaluate: Evaluate,
               reflect: Callable[[str], str], step: int, budget: int, rng,
               operators: Sequence[str] = ("reflect",), demo_buffer: Sequence = (),
               minibatch_size: int = 3, top_k: int = 4, max_prompt_chars: int = 4000,
               problem_text: Callable[[dict], str] = lambda p: p["question"],
               patience: int = 10) -> dict:
    """Improve the pool in place on this round's anchor set; return stats.

    evaluate(prompt_texts, problems) scores aligned (prompt, problem) pairs, one rollout each, in one
    batched call -> [(completion, reward, feedback)]. reflect(prompt) -> the reflector's raw text.
    Budget = metric calls (rollouts) of the proposal loop (paper: 5 x anchors). Scoring the L live
    prompts on the anchor set first is the round's step 2 and is counted in metric_calls but not
    charged to the budget: with K = 4 it would otherwise eat 4/5 of it. A proposal starts only while
    a minibatch still fits, but an accepted child is always scored on the rest of the anchors, so
    metric_calls <= L * len(anchors) + budget + len(anchors) - minibatch. `patience` consecutive
    iterations that spend nothing (skips, guard rejections) end the round: reflecting costs time too.
    """
    if unknown := set(operators) - set(OPERATORS):
        raise ValueError(f"unknown operators {sorted(unknown)}; known: {OPERATORS}")
    if not anchor_problems:
        raise ValueError("fast_round needs at least one anchor problem")
    t0 = time.perf_counter()
    anchors = list(anchor_problems)
    ids = [str(p["id"]) for p in anchors]
    questions = [problem_text(p) for p in anchors]
    outputs: dict[tuple[int, str], tuple[str, float, str]] = {}   # (prompt id, problem id) -> result
    stats = {"step": step, "anchor_size": len(anchors), "budget": budget, "metric_calls": 0,
             "proposals": 0, "accepted": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0),
             "skipped": dict.fromkeys(SKIP_REASONS, 0), "proposals_by_operator": dict.fromkeys(operators, 0),
             "accepted_by_operator": dict.fromkeys(operators, 0), "accepted_prompts": []}

    def run(texts: list[str], problems: list[dict]) -> list[tuple[str, float, str]]:
        results = evaluate(texts, problems)
        if len(results) != len(texts):
            raise ValueError(f"evaluate returned {len(results)} results for {len(texts)} pairs")
        stats["metric_calls"] += len(texts)
        return results

    def record(prompt: Prompt, indices: list[int], results) -> None:
        for i, result in zip(indices, results, strict=True):
            prompt.scores[ids[i]] = result[1]
            outputs[prompt.id, ids[i]] = result

    # The prompts RL used since the last round; survivors outside the top K are dropped here, since
    # their scores belong to an old anchor set and re-scoring them all would eat the whole budget.
    live = [p for p in pool if p.in_top_k] or list(pool)
    pool.retain({p.id for p in live})
    everything = list(range(len(anchors)))
    results = run([p.text for p in live for _ in anchors], anchors * len(live))
    for n, prompt in enumerate(live):
        prompt.scores = {}
        record(prompt, everything, results[n * len(anchors):(n + 1) * len(anchors)])
    stats["best_score_before"] = pool.best().mean_score()
    stats["mean_score_before"] = sum(p.mean_score() for p in live) / len(live)

    size = min(minibatch_size, len(anchors))
    idle = turn = 0
    scoring_calls = stats["metric_calls"]
    while stats["metric_calls"] - scoring_calls + size <= budget and idle < patience:
        idle += 1                                    # reset below once this iteration spends budget
        parent = pool.sample_parent(rng, ids)
        operator = operators[turn % len(operators)]
        turn += 1
        batch = _failures_first(parent, ids, size, rng)
        if batch is None:
            stats["skipped"]["perfect_parent"] += 1
            continue
        if operator == "reflect":
            examples = [{"question": questions[i], "output": outputs[parent.id, ids[i]][0],
                         "reward": outputs[parent.id, ids[i]][1], "feedback": outputs[parent.id, ids[i]][2]}
                        for i in batch]
            text, reason = vet_reflection(reflect(build_reflection_prompt(parent.text, examples)),
                                          parent.text, questions, max_prompt_chars)
        else:
            text = make_demo(parent.text, demo_buffer, set(ids), rng, problem_text)
            if text is None:
                stats["skipped"]["no_demo"] += 1
                continue
            reason = check_proposal(text, parent.text, questions, max_prompt_chars)
        stats["proposals"] += 1
        stats["proposals_by_operator"][operator] += 1
        if reason:
            stats["rejected"][reason] += 1
            continue
        idle = 0
        child_results = run([text] * len(batch), [anchors[i] for i in batch])
        # The parent's side of the test is its anchor scores from this round (same weights, one
        # rollout each), not a fresh re-run: it saves budget, and they are the very rollouts the
        # reflector just read.
        if sum(r for _, r, _ in child_results) <= sum(parent.scores[ids[i]] for i in batch):
            stats["rejected"]["not_better"] += 1
            continue
        child = pool.add(text, parent_id=parent.id, step=step, operator=operator)
        record(child, batch, child_results)
        rest = [i for i in everything if i not in batch]
        record(child, rest, run([text] * len(rest), [anchors[i] for i in rest]) if rest else [])
        stats["accepted"] += 1
        stats["accepted_by_operator"][operator] += 1
        stats["accepted_prompts"].append(text)

    pool.retain({p.id for p in pool.nondominated(ids)})
    active = pool.top_k(top_k, ids)
    stats.update(best_score_after=pool.best().mean_score(),
                 mean_score_after=sum(p.mean_score() for p in active) / len(active),
                 pool_size=len(pool), top_k_ids=[p.id for p in active],
                 seconds=time.perf_counter() - t0)
    return stats


# ---------------------------------------------------------------- model-backed adapters
def make_evaluate(model, tokenizer, task, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, generator=None) -> Evaluate:
    """evaluate() for fast_round: all pairs in ONE rollout.sample call, graded by the task."""
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
                             generator=generator)
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


def make_reflector(model, tokenizer, *, use_adapter: bool, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, generator=None) -> Callable[[str], str]:
    """reflect() for fast_round: the same model in the same process. use_adapter=False runs under
    peft's disable_adapter(), i.e. the frozen base model critiques (a frozen reflector at no extra
    memory); a model without that context manager (no LoRA) just runs as it is."""
    import rollout

    def reflect(prompt: str) -> str:
        chat = rollout.encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        disable = getattr(model, "disable_adapter", None)
        with disable() if disable is not None and not use_adapter else contextlib.nullcontext():
            out = rollout.sample(model, tokenizer, [chat], [1], max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, generator=generator)
        return out.texts[0]

    return reflect
