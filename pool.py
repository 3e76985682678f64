"""pool.py -- the fast weights: a small pool of contexts (an instruction and worked examples), their
scores on the current anchor set, the per-problem Pareto fronts that pick parents and the top K that RL
samples with, and each context's lineage. context_opt.py's round changes the pool; fst.py samples
with it and saves it; eval.py reads the best context of a saved one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

DemoFormat = Literal["turns", "system"]   # worked examples as user/assistant turns, or inside the system text


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
        """The instruction, then each demo as "Example: Problem ... Solution ..." (the "system" format's text)."""
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

    def coverage(self, problem_ids: Sequence[str] | None = None) -> dict[int, int]:
        """Non-dominated prompt id -> number of problems on whose front it stands. A dominator stands on
        every front its dominated prompt stands on, so dropping dominated ones changes no front."""
        front = self.pareto_front(problem_ids)
        return {p.id: sum(1 for ids in front.values() if p.id in ids) for p in self.nondominated(problem_ids)}

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

    def context(self, prompt: Prompt) -> Context:
        """What the model sees of a pool member."""
        return Context(prompt.text, tuple(tuple(d) for d in prompt.demos), self.demo_format)

    def best(self) -> Prompt:
        return max(self.prompts.values(), key=lambda p: (p.mean_score(), -p.id))

    def to_json(self) -> dict:
        return {"next_id": self.next_id, "demo_format": self.demo_format,
                "prompts": [asdict(p) for p in self.prompts.values()]}

    @classmethod
    def from_json(cls, data: dict) -> PromptPool:
        pool = cls(demo_format=data.get("demo_format", "system"))  # pools saved before demos had none
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


def best_context(ckpt: str | Path) -> Context | None:
    """The best context of a checkpoint's pool (instruction and demos); None when it saved no pool."""
    path = Path(ckpt) / "pool.json"
    if not path.exists():
        return None
    pool = PromptPool.load(path)
    return pool.context(pool.best())


def lineage(run: Path, prompt_id: int) -> list[str]:
    """The operators that made a pool member, oldest first, from every pool file the run saved (a pruned
    ancestor is in an earlier file)."""
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
