"""context_opt.py -- the fast loop: every T RL steps a round of reflective prompt evolution (GEPA)
improves the pool of contexts (pool.py) that RL samples with.

Top to bottom: the config's `fast` section; `fast_round`, the round as numbered steps; the operators
(a new one is one more @operator function); the guards that reject malformed proposals; the model
bindings. The round is model-free: it calls `evaluate` and `reflect`, which the bindings (make_evaluate,
make_reflector, an OpenAI-compatible endpoint's reflector) tie to a model; measure_accuracy is the
held-out measurement that training's validation and eval.py share.
"""
from __future__ import annotations

import os
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Sequence

import rewards
import rollout
from plumbing import config, dist as torchrun, models
from pool import Context, DemoFormat, Prompt, PromptPool, as_context

PERFECT = 1.0        # rewards live in [0, 1]; a prompt at 1.0 on a problem has nothing to learn there
REJECT_REASONS = ("empty", "no_fence", "too_long", "thinking", "same_as_parent", "duplicate", "copies_anchor",
                  "copies_question", "copies_example", "not_better")
# the reflector's reply: starts inside the block (paragraph: and ends at its first blank line), or free-form
ReplyFormat = Literal["fenced", "paragraph", "free"]
REPLY_FORMATS = typing.get_args(ReplyFormat)
FENCE = "```"
COPY_NGRAM = 8       # words per n-gram when looking for an anchor question pasted into a prompt
COPY_FRACTION = 0.5  # share of a question's n-grams found in the prompt that counts as a copy


# ---------------------------------------------------------------- the config's `fast` section
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
    max_proposals: int = 0  # end a round after N proposals (0 = no cap): equal work (bench/fast_round.py)
    patience: int = 10  # end a round after this many draws in a row that spend nothing (skips, guard rejections)
    # (ours) fst.py trains on the round's rollouts too (the current policy's): none (the paper); pool: the live
    # pool's; all: every one (study 1, results/miniature: rl's best accuracy in 361 rollouts, fst's 560)
    reuse: Literal["none", "pool", "all"] = "all"

    ranges = {"every": ">= 1", "pool_size": ">= 1", "budget": "> 0", "minibatch": ">= 1", "wave": ">= 1",
              "max_proposals": ">= 0", "patience": ">= 1", "max_demos": ">= 0", "max_prompt_chars": ">= 1",
              "reflector_max_new_tokens": ">= 1", "reflector_temperature": ">= 0", "reflector_top_p": "(0, 1]",
              "reflector_timeout": "> 0", "reflector_retries": ">= 0", "reflector_max_in_flight": ">= 1"}

    def on_endpoint(self) -> bool:
        """The reflector is a model behind an OpenAI-compatible endpoint (openai:<model>)."""
        return self.reflector.startswith(ENDPOINT_PREFIX)

    def check(self, prefix: str = "") -> None:
        """What `ranges` cannot say: at least one operator, every one a registered one; a reflector model
        that can exist, or an endpoint's with a model name."""
        if self.on_endpoint():
            if not self.reflector[len(ENDPOINT_PREFIX):].strip():
                raise config.ConfigError(f"config key '{prefix}reflector' must name the endpoint's model: "
                                         f"{ENDPOINT_PREFIX}<model>")
        elif self.reflector not in ("base", "policy") and (why := models.model_name_problem(self.reflector)):
            raise config.ConfigError(f"config key '{prefix}reflector' must be base, policy or a model "
                                     f"(or {ENDPOINT_PREFIX}<model>, an endpoint's): {why}")
        if not self.operators:
            raise config.ConfigError(f"config key '{prefix}operators' must name at least one of {list(OPERATORS)}")
        for i, name in enumerate(self.operators):
            if name not in OPERATORS:
                raise config.ConfigError(
                    f"config key '{prefix}operators[{i}]' must be one of {list(OPERATORS)}, got {name!r}")


# ---------------------------------------------------------------- the round
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
# on_rollouts(phase, contexts, problems, results) after every evaluate call of a round, by ROUND_PHASES: the
# live pool on every anchor, a wave's minibatch tests (children, parents), accepted children on every anchor
OnRollouts = Callable[[str, list[Context], list[dict], list], None]
ROUND_PHASES = ("pool", "children", "parents", "accepted")


class Reflection(NamedTuple):
    """One reply of the reflector: its text and tokens; an endpoint's also its call's seconds, the model
    that answered and its error. A reflect() callable may return plain strings instead (scripted)."""
    text: str
    tokens: int = 0
    seconds: float = 0.0
    model: str = ""          # "" for an in-process reflector (its calls are not itemised)
    error: str = ""


Reflect = Callable[[list[list[dict]]], list["Reflection | str"]]  # reflector chats -> replies


def fast_round(pool: PromptPool, anchor_problems: Sequence[dict], cfg: FastConfig, *, evaluate: Evaluate,
               reflect: Reflect, step: int, rng, demo_buffer: Sequence = (), progress=None,
               on_rollouts: OnRollouts | None = None, task_questions: Sequence[str] = ()) -> dict:
    """One round: improve `pool` in place on the anchor problems (dicts with "id" and "question"); return
    its stats. evaluate(contexts, problems) -> one Scored per aligned pair; reflect(chats) -> one reply
    per chat; each call batched. demo_buffer: (problem, completion, reward) of earlier RL rollouts;
    task_questions: the task's worked examples' (no instruction may paste one, nor an anchor's).
    progress(proposals=, spent=, budget=, accepted=, best=) after the pool's scoring and each wave."""
    r = _Round.start(pool, anchor_problems, cfg, evaluate=evaluate, reflect=reflect, step=step, rng=rng,
                     demo_buffer=demo_buffer, on_rollouts=on_rollouts, task_questions=task_questions)
    show = progress or (lambda **numbers: None)
    # 1. Score the live pool (the prompts RL sampled with since the last round) on every anchor. The others
    # leave: their scores belong to an old anchor set, and re-scoring them would eat the budget. Counted in
    # metric_calls, not charged to the budget (with K = 4 it would spend 4/5 of it).
    live = [p for p in pool if p.in_top_k] or list(pool)
    pool.retain({p.id for p in live})
    r.score_on_anchors(live, "pool")
    r.stats.update(best_score_before=pool.best().mean_score(),
                   mean_score_before=sum(p.mean_score() for p in live) / len(live))
    r.scoring_calls = r.stats["metric_calls"]
    show(proposals=0, spent=0, budget=r.budget, accepted=0, best=pool.best().mean_score())
    # Waves of up to cfg.wave children, each drawn from the pool as it stands (wave=1: each sees the ones
    # accepted before it), until the budget, cfg.patience idle draws in a row or cfg.max_proposals end it.
    while r.spent() + r.most <= r.budget and r.idle < cfg.patience and not r.capped():
        draws, reserved, rescored, idle = [], 0, set(), r.idle     # draws: Proposal, or None for a skip
        while (sum(d is not None for d in draws) < cfg.wave and idle < cfg.patience and not r.capped()
               and r.spent() + reserved + r.most <= r.budget):      # a child the budget cannot test: none
            # 2. Parent: a non-dominated prompt, drawn in proportion to the anchors on whose front it stands.
            parent = pool.sample_parent(rng, r.ids)
            name = cfg.operators[r.turn % len(cfg.operators)]
            r.turn += 1
            # 3. Minibatch: cfg.minibatch anchors, the parent's failures first; None when it fails none
            # (no child could strictly beat it).
            batch = _failures_first(parent.scores, r.ids, r.size, rng)
            # 4. The operator (cfg.operators in turn) writes the child, or the chat a reflection answers.
            proposal = r.propose(name, parent, batch) if batch is not None else r.skip("perfect_parent")
            draws.append(proposal)
            # 5. Vet a ready child (a reflected one after the wave's reflect call): the guards, no copy.
            if proposal is None or (proposal.text is not None and r.guard(proposal)):
                idle += 1
                continue
            fresh = {(proposal.parent.id, i) for i in proposal.batch} - rescored if cfg.rescore_parent else set()
            reserved, rescored, idle = reserved + r.size + len(fresh), rescored | fresh, 0  # its test's cost
        proposals = [d for d in draws if d is not None]
        r.stats["waves"] += bool(proposals)
        _reflect(r, proposals)                      # 4-5 for reflections: one reflect call, then the guards
        # 6. Each vetted child against its own parent on the child's minibatch (one evaluate call).
        trying = [p for p in proposals if p.reason is None]
        accepted = []
        for proposal, (child_sum, parent_sum) in zip(trying, _minibatch_test(r, trying), strict=True):
            # 7. Accept only a child whose summed reward strictly beats its parent's (and that no pool
            # member equals); then score it on every anchor with fresh draws: the minibatch draws that won
            # its test are its lucky ones, and would flatter it on the fronts.
            if child_sum <= parent_sum:
                r.reject(proposal, "not_better")
            elif child := r.admit(proposal):
                accepted.append(child)
        r.score_on_anchors(accepted, "accepted")
        for draw in draws:                          # patience counts the draws that spent nothing, in order
            r.idle = 0 if draw is not None and draw.scored else r.idle + 1
        show(proposals=r.stats["proposals"], spent=r.spent(), budget=r.budget, accepted=r.stats["accepted"],
             best=pool.best().mean_score())
    # 8. The pool keeps its Pareto front; its top cfg.pool_size prompts are the ones RL samples with.
    pool.retain({p.id for p in pool.nondominated(r.ids)})
    active = pool.top_k(cfg.pool_size, r.ids)
    r.stats.update(best_score_after=pool.best().mean_score(),
                   mean_score_after=sum(p.mean_score() for p in active) / len(active), pool_size=len(pool),
                   top_k_ids=[p.id for p in active], seconds=time.perf_counter() - r.started)
    return r.stats


@dataclass(kw_only=True)
class _Round:
    """What one fast_round and its operators share. An accepted child is scored on every anchor whatever
    budget is left, so metric_calls <= live prompts x anchors + budget + wave x anchors."""
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
    budget: int                         # metric calls of the proposals: int(cfg.budget x anchors)
    demo_buffer: Sequence
    size: int                           # minibatch size
    most: int                           # the most one proposal can cost on its minibatch
    # (prompt id, problem id) -> (completion, reward, feedback) of its latest rollout
    outputs: dict[tuple[int, str], tuple[str, float, str]] = field(default_factory=dict)
    on_rollouts: OnRollouts | None = None  # fast_round's caller sees every scored rollout (fst.py: reuse)
    seen_questions: list[str] = field(default_factory=list)  # no instruction may paste one (demo buffer, task's)
    scoring_calls: int = 0              # metric calls scoring the live pool: not charged to the budget
    turn: int = 0                       # draws so far: picks the next operator
    idle: int = 0                       # consecutive draws that spent nothing
    started: float = 0.0                # perf_counter() at the round's start

    @classmethod
    def start(cls, pool: PromptPool, anchor_problems: Sequence[dict], cfg: FastConfig, *, step: int,
              demo_buffer: Sequence, task_questions: Sequence[str], **given) -> _Round:
        """A round's state, once its settings are known to run (given: evaluate, reflect, rng, on_rollouts)."""
        config.check_ranges(cfg, "fast.")  # a round built in code gets a config's checks (wave >= 1, operators...)
        if not anchor_problems:
            raise ValueError("fast_round needs at least one anchor problem")
        started, anchors = time.perf_counter(), list(anchor_problems)
        budget, size = int(cfg.budget * len(anchors)), min(cfg.minibatch, len(anchors))
        seen = dict.fromkeys([*task_questions, *(problem["question"] for problem, _, _ in demo_buffer)])
        return cls(cfg=cfg, pool=pool, anchors=anchors, ids=[str(p["id"]) for p in anchors],
                   questions=[p["question"] for p in anchors], seen_questions=list(seen),
                   stats=_new_stats(step, len(anchors), budget, cfg), step=step, budget=budget, demo_buffer=demo_buffer,
                   size=size, most=size * (2 if cfg.rescore_parent else 1), started=started, **given)

    def spent(self) -> int:
        """Metric calls charged to the budget so far."""
        return self.stats["metric_calls"] - self.scoring_calls

    def capped(self) -> bool:
        """Has the round made the most proposals it may (cfg.max_proposals; 0 = no cap)?"""
        return bool(self.cfg.max_proposals) and self.stats["proposals"] >= self.cfg.max_proposals

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

    def score_on_anchors(self, prompts: list[Prompt], phase: str) -> None:
        """Steps 1 and 7: each prompt on every anchor, all in one evaluate call; its scores replaced."""
        n_anchors = len(self.anchors)
        results = self.run([self.pool.context(p) for p in prompts for _ in self.anchors],
                           self.anchors * len(prompts), phase)
        for n, prompt in enumerate(prompts):
            prompt.scores = {}
            for pid, result in zip(self.ids, results[n * n_anchors:(n + 1) * n_anchors], strict=True):
                prompt.scores[pid] = result[1]
                self.outputs[prompt.id, pid] = result

    def propose(self, name: str, parent: Prompt, batch: list[int]) -> Proposal | None:
        """Step 4: operator `name`'s proposal, held to its contract and counted; None for its skip."""
        op, started = OPERATORS[name], time.perf_counter()
        proposal = op.propose(self, parent, batch)
        self.stats["seconds_proposing"] += time.perf_counter() - started
        if proposal is None:
            if op.skip is None:
                raise ValueError(f"operator {name!r} skipped a draw but registered no skip reason (@operator skip=)")
            return self.skip(op.skip)
        if (proposal.text is None) == (proposal.reflection_prompt is None):
            has = "both text and" if proposal.text is not None else "neither text nor"
            raise ValueError(f"operator {name!r} returned a proposal with {has} reflection_prompt: "
                             "it must set exactly one")
        proposal.operator = name
        self.stats["proposals"] += 1
        self.stats["proposals_by_operator"][name] += 1
        return proposal

    def skip(self, reason: str) -> None:  # a draw that proposes nothing
        self.stats["skipped"][reason] += 1

    def guard(self, proposal: Proposal) -> str | None:
        """Step 5 on a child's whole context (instruction and demos): check_proposal against its parent,
        and no copy of a context the pool already holds. Rejects it and returns the reason, if any."""
        child = proposal.context(self.pool.demo_format)
        reason = check_proposal(child.text(), self.pool.context(proposal.parent).text(), self.questions,
                                self.cfg.max_prompt_chars)
        reason = reason or ("duplicate" if any(child == self.pool.context(p) for p in self.pool) else None)
        if reason:
            self.reject(proposal, reason)
        return reason

    def admit(self, proposal: Proposal) -> Prompt | None:
        """Step 7: a child that won its test joins the pool, unless it equals a member (one accepted
        earlier in the wave); returns it, or None when rejected as a duplicate."""
        context = proposal.context(self.pool.demo_format)
        if any(context == self.pool.context(p) for p in self.pool):
            self.reject(proposal, "duplicate")
            return None
        self.stats["accepted"] += 1
        self.stats["accepted_by_operator"][proposal.operator] += 1
        self.stats["accepted_prompts"].append(context.text())
        return self.pool.add(context.instruction, parent_id=proposal.parent.id, step=self.step,
                             operator=proposal.operator, demos=context.demos)

    def reject(self, proposal: Proposal, reason: str) -> None:
        proposal.reason = reason
        self.stats["rejected"][reason] += 1
        self.stats["rejected_by_operator"][proposal.operator][reason] += 1


def _new_stats(step: int, anchor_size: int, budget: int, cfg: FastConfig) -> dict:
    operators = cfg.operators
    skips = ["perfect_parent", *(OPERATORS[op].skip for op in operators if OPERATORS[op].skip),
             *(["reflector_error"] if cfg.on_endpoint() else [])]
    return {"step": step, "anchor_size": anchor_size, "budget": budget, "wave": cfg.wave, "metric_calls": 0,
            "waves": 0, "proposals": 0, "accepted": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0),
            "rejected_by_operator": {op: dict.fromkeys(REJECT_REASONS, 0) for op in operators},
            "skipped": dict.fromkeys(skips, 0), "proposals_by_operator": dict.fromkeys(operators, 0),
            "accepted_by_operator": dict.fromkeys(operators, 0), "accepted_prompts": [],
            "seconds_reflecting": 0.0, "seconds_scoring": 0.0, "seconds_proposing": 0.0, "reflector_tokens": 0,
            "reflector": cfg.reflector, "reflector_replies": []}  # an endpoint's calls: {model, tokens, seconds, error}


def _failures_first(scores: dict[str, float], problem_ids: list[str], size: int, rng) -> list[int] | None:
    """Step 3: indices of a minibatch among the problems the parent has `scores` (its rewards) on: its
    failures (in random order) first, then the rest; None when it is perfect on all of them."""
    order = [i for i in range(len(problem_ids)) if problem_ids[i] in scores]
    rng.shuffle(order)
    order.sort(key=lambda i: scores[problem_ids[i]] >= PERFECT)   # stable: keeps the shuffle
    return None if not order or scores[problem_ids[order[0]]] >= PERFECT else order[:size]


def _reflect(r: _Round, proposals: list[Proposal]) -> None:
    """Steps 4-5 for the wave's reflections: every one in one batched reflect call, then the guards."""
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
        if reply.error:  # a call that failed after its retries: a skip, not a proposal (nothing spent)
            proposal.reason = "reflector_error"
            r.stats["proposals"] -= 1
            r.stats["proposals_by_operator"][proposal.operator] -= 1
            r.stats["skipped"]["reflector_error"] = r.stats["skipped"].get("reflector_error", 0) + 1
            print(f"[fst] reflector call failed, proposal skipped (reflector_error): {reply.error}", file=sys.stderr)
            continue
        proposal.text, reason = vet_reflection(reply.text, proposal.parent.text, r.questions,
                                               r.cfg.max_prompt_chars, r.seen_questions)
        if reason:
            r.reject(proposal, reason)
        else:
            r.guard(proposal)                    # a reply that passed: its whole context, as a demo child's


def _minibatch_test(r: _Round, trying: list[Proposal]) -> list[tuple[float, float]]:
    """Step 6: every child on its minibatch and (cfg.rescore_parent) each parent afresh, in one evaluate call
    -> per child (its summed reward, its parent's). The minibatch holds the parent's failures, its unlucky
    draws: judged against those, a child no better than its parent passes about twice as often as fair."""
    if unready := [p.operator for p in trying if p.text is None]:
        raise RuntimeError(f"proposals of operators {unready} reached scoring without a candidate text")
    child_pairs = [(p.context(r.pool.demo_format), i) for p in trying for i in p.batch]
    parent_pairs = (list(dict.fromkeys((p.parent.id, i) for p in trying for i in p.batch))
                    if r.cfg.rescore_parent else [])
    pairs = child_pairs + [(r.pool.context(r.pool[pid]), i) for pid, i in parent_pairs]
    results = r.run([context for context, _ in pairs], [r.anchors[i] for _, i in pairs],
                    ["children"] * len(child_pairs) + ["parents"] * len(parent_pairs))
    fresh = {pair: result[1] for pair, result in zip(parent_pairs, results[len(child_pairs):], strict=True)}
    sums, at = [], 0
    for p in trying:
        child_sum = sum(result[1] for result in results[at:at + len(p.batch)])
        parent_sum = sum(fresh[p.parent.id, i] if r.cfg.rescore_parent else p.parent.scores[r.ids[i]]
                         for i in p.batch)
        sums.append((child_sum, parent_sum))
        at += len(p.batch)
    return sums


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
    operator: str = ""                  # the name it was registered under (set by the round)
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
    """Register `propose(r, parent, batch) -> Proposal | None` as the operator `name`: it reads the round `r`
    (anchors, rollouts so far, rng, demo buffer); None skips the draw (counted as `skip`)."""
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


# One worked reflection, for a task fst does not train on, shown as an earlier turn: a small model follows an
# example far more often than a description. Its text is banned from children (copies_example); its start
# shares no words with the seed prompts, so a copy can never pass as a mere shortening of its parent.
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
    fresh = [(reward, problem["question"], completion) for problem, completion, reward in r.demo_buffer
             if reward >= PERFECT and str(problem["id"]) not in r.ids
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
    """Does a reflected instruction parrot the worked reflection (a 135M reflector mostly does) instead of
    reading its own attempts? At least half of the word n-grams it adds to its parent are example_text's."""
    words = lambda t: re.findall(r"\w+", t.lower())  # noqa: E731
    n = max(1, min(n, len(words(text))))  # a reply shorter than n words ("Answer the question.") is still judged
    parent = _ngrams(words(parent_text), n)
    added = _ngrams(words(text), n) - parent
    banned = _ngrams(words(example_text), n) - parent
    return bool(added) and len(added & banned) >= COPY_FRACTION * len(added)


def vet_reflection(reflector_output: str, parent_text: str, anchor_questions: Sequence[str],
                   max_chars: int, seen_questions: Sequence[str] = ()) -> tuple[str | None, str | None]:
    """Raw reflector text -> (candidate instruction, None) or (None, rejection reason). An instruction that
    pastes one of `seen_questions` (the demo buffer's, the task's worked example's) is copies_question."""
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


# ---------------------------------------------------------------- model-backed adapters
def measure_accuracy(model, tok, task, problems, system_prompt, *, k=4, max_new_tokens, temperature,
                     top_p=1.0, generator=None, use_adapter=True, stop=(), batch_size=None, max_rows=None,
                     dist=None) -> dict:
    """k samples per problem in one rollout.sample call. mean@k: mean reward of the n*k samples; accuracy:
    share of them with reward >= 1 (partial credit differs); pass@k: share of problems with one such
    sample. Under torchrun (dist) each rank samples its slice; all return the numbers over all problems."""
    dist = dist or torchrun.Dist()
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
    """evaluate() for fast_round: all pairs in ONE rollout.sample call, graded by the task; sampled as RL's
    rollouts are, or a prompt's score would measure another policy than the one RL trains."""

    def evaluate(contexts: list[Context | str], problems: list[dict]) -> list[tuple[str, float, str]]:
        # Identical (context, problem) pairs become one chat prompt with a count: one prefill
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
    """reflect() for fast_round: a model in this process, a wave's prompts in ONE rollout.sample call
    (use_adapter=False: the frozen base critiques). "fenced": the turn starts inside a fence and stops at
    the closing one, so the reply IS the new prompt (closed for it at EOS, left open when cut off:
    no_fence); "paragraph": a blank line ends it too (a small model's rambling never reaches the guards);
    "free": the plain reply, for a strong reflector that reasons first."""
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
                                 temperature=temperature, top_p=top_p, stop=stop, generator=generator)
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


# ---------------------------------------------------------------- a reflector behind an OpenAI-compatible endpoint
# fast.reflector: openai:<model> (vLLM, SGLang, llama-server, Ollama, a host) through the `openai` client, whose
# retries cover 429, 5xx, timeouts and dropped connections; the round skips a call that still fails (reflector_error).
ENDPOINT_PREFIX = "openai:"


class EndpointReply(typing.NamedTuple):
    """One chat completion of a ChatEndpoint, or why it failed."""
    text: str
    finish_reason: str          # "stop" (the model ended it), "length" (max tokens); "" when it failed
    tokens: int                 # completion tokens as the server counts them (0: it reports no usage)
    seconds: float              # the call's wall time, retries included
    model: str                  # the model id the server says answered (the configured one when it failed)
    error: str = ""             # why it failed after its retries, in one line; "" when it answered


class ChatEndpoint:
    """A chat model behind an OpenAI-compatible endpoint (url "": OPENAI_BASE_URL). The key comes from
    OPENAI_API_KEY only, so no config, log or tracker can hold it (a local server takes a placeholder)."""

    def __init__(self, model: str, url: str = "", *, timeout: float, retries: int, max_in_flight: int):
        try:
            import openai
        except ImportError:
            raise SystemExit(f"fast.reflector={ENDPOINT_PREFIX}{model} needs the openai package "
                             "(pip install openai)") from None
        self.openai, self.model, self.max_in_flight = openai, model, max_in_flight
        self._key = os.environ.get("OPENAI_API_KEY") or "no-key"
        self.client = openai.OpenAI(base_url=url or None, api_key=self._key, timeout=timeout, max_retries=retries)
        self.url = str(self.client.base_url)

    def _why(self, error: Exception) -> str:
        """An exception in one line, the key (should a server echo it) blanked out."""
        line = (str(error).splitlines() or [""])[0][:300].replace(self._key, "***")
        return f"{type(error).__name__}: {line}"

    def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float) -> EndpointReply:
        started = time.perf_counter()
        try:
            out = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                      temperature=temperature, top_p=top_p)
        except self.openai.OpenAIError as e:
            return EndpointReply("", "", 0, time.perf_counter() - started, self.model, self._why(e))
        # 200 with no choice or message: a failed call (one skipped proposal); usage without a count: 0 tokens
        choice = (getattr(out, "choices", None) or [None])[0]
        if getattr(choice, "message", None) is None:
            return EndpointReply("", "", 0, time.perf_counter() - started, self.model, "EmptyReply: no message")
        return EndpointReply(choice.message.content or "", choice.finish_reason or "stop",
                             getattr(getattr(out, "usage", None), "completion_tokens", None) or 0,
                             time.perf_counter() - started, getattr(out, "model", None) or self.model)

    def complete_many(self, chats: list[list[dict]], **sampling) -> list[EndpointReply]:
        """complete() of every chat, concurrently (at most max_in_flight at once), in the chats' order."""
        from concurrent.futures import ThreadPoolExecutor   # the client is thread-safe: one for all calls
        calls = ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, len(chats))))
        try:  # Ctrl-C comes back at once: queued calls dropped, none waited for (timeout x tries each)
            return list(calls.map(lambda chat: self.complete(chat, **sampling), chats))
        finally:
            calls.shutdown(wait=False, cancel_futures=True)

    def probe(self) -> None:
        """At start-up: does the endpoint answer, and does it serve the model? One line (SystemExit) if not.
        The model list first; a server without one (404) is asked for a one-token reply instead."""
        where = f"fast.reflector={ENDPOINT_PREFIX}{self.model} at {self.url}"
        try:
            served = [m.id for m in self.client.models.list()]
        except self.openai.NotFoundError:
            served = None
        except self.openai.OpenAIError as e:
            raise SystemExit(f"{where}: the endpoint does not answer: {self._why(e)}") from None
        if served is not None and self.model not in served:
            raise SystemExit(f"{where}: no such model there (it serves {', '.join(served[:8]) or 'none'})")
        if served is None and (reply := self.complete([{"role": "user", "content": "Hi"}], max_tokens=1,
                                                      temperature=0.0, top_p=1.0)).error:
            raise SystemExit(f"{where}: the endpoint does not answer: {reply.error}")


def reflector_endpoint(fast: FastConfig) -> ChatEndpoint:
    """The ChatEndpoint of a config's `fast` section (fast.reflector = openai:<model>)."""
    return ChatEndpoint(fast.reflector[len(ENDPOINT_PREFIX):], fast.reflector_url, timeout=fast.reflector_timeout,
                        retries=fast.reflector_retries, max_in_flight=fast.reflector_max_in_flight)


def as_prefilled(reply: str, finish_reason: str, reply_format: ReplyFormat) -> str:
    """An endpoint's reply as make_reflector would have returned it (an endpoint cannot continue a turn we
    start, so nothing is pre-filled and no stop strings are sent): read from after its first opening fence,
    cut at the format's first stop string, closed unless max tokens cut it ("length": no_fence)."""
    if reply_format == "free":
        return reply
    opening = re.search(rf"{FENCE}[^\n`]*\n", reply)
    body = (reply[opening.end():] if opening else reply).lstrip("\n")
    stops = [at for s in ([FENCE, "\n\n"] if reply_format == "paragraph" else [FENCE]) if (at := body.find(s)) >= 0]
    closed = bool(stops) or finish_reason == "stop"
    body = body[:min(stops)] if stops else body
    return f"{FENCE}\n" + (body.rstrip() + f"\n{FENCE}" if closed else body)


def make_endpoint_reflector(endpoint: ChatEndpoint, *, max_new_tokens: int, temperature: float = 1.0,
                            top_p: float = 1.0, reply_format: ReplyFormat = "fenced") -> Reflect:
    """reflect() for fast_round from an endpoint's model: a wave's prompts at once, each reply read as a
    pre-filled one (as_prefilled); a call that fails after its retries is a Reflection with its error."""
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
    policy model reflects), a ChatEndpoint for openai:<model>, else another causal LM (frozen)."""
    if fast.reflector in ("base", "policy"):
        return None
    if fast.on_endpoint():
        return reflector_endpoint(fast)
    return models.load_frozen_model(fast.reflector, model_cfg, device)


def reflector_for(fast: FastConfig, loaded, model, tokenizer, generator=None) -> Reflect:
    """A round's reflect(): the endpoint's, or the in-process one on `loaded` (load_reflector's frozen
    model), else on the policy `model` (adapter off for base, on for policy)."""
    settings = dict(max_new_tokens=fast.reflector_max_new_tokens, temperature=fast.reflector_temperature,
                    top_p=fast.reflector_top_p, reply_format=fast.reflector_format)
    if isinstance(loaded, ChatEndpoint):
        return make_endpoint_reflector(loaded, **settings)
    return make_reflector(*(loaded or (model, tokenizer)), use_adapter=fast.reflector == "policy",
                          generator=generator, **settings)
