"""fst.py -- Fast-Slow Training (arXiv 2605.12484) in one loop you can read top to bottom.

    python fst.py --config configs/tiny.yaml                  # CPU, SmolLM2-135M, minutes
    python fst.py --config gsm8k.yaml --set mode=fst          # one 24 GB GPU, QLoRA, GSM8K
    python fst.py --resume runs/tiny-rl-20261129-160000       # continue from the last checkpoint

Slow weights: LoRA adapters (on a 4-bit base on GPU) trained every step by a GRPO-family loss
(`cispo` as in the paper; `grpo`, `dr_grpo`, `dapo`) from verifiable rewards.
Fast weights: a small Pareto pool of contexts (pool.py) evolved every T steps by reflective mutation
(context_opt.py), with the same model in the same process as critic (adapter off = frozen base).
`mode: rl | fst | gepa` picks the paper's arms: slow only, both, fast only.

What this file is, and what was simplified on purpose:
- One optimiser step per batch; the "old" log-probs are the sampler's own (no extra pass). On a fresh
  batch the ratio is 1 up to rounding (train.tis_cap corrects that gap in bf16); on fast-round rollouts
  trained later (fast.reuse) it corrects their lag, truncated or clipped by the loss. No multi-epoch PPO.
- The reference model for KL is the same weights with the adapter disabled, never a second copy. KL to
  base (k3 on the sampled tokens: one no-grad base pass) is always measured, in the loss if kl_coef > 0.
- No vLLM, no trainer framework: sampling is rollout.py's batched group sampler, the loss is below.
- Each step re-seeds from (seed, step), so a resumed run replays an uninterrupted one exactly.
- The plumbing (config parsing, model loading, torchrun, guards, checkpoints, trackers) is plumbing/'s.
Layout: config -> the RL math (a loss is one registered function) -> the step's phases -> `train` -> main.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
from tqdm import tqdm

import context_opt
import rewards
import rollout
from context_opt import FastConfig
from plumbing import checkpoints, config, dist as torchrun, guards, models, runlog, seeds, startup
from plumbing.config import ConfigError
from plumbing.dist import Dist
from plumbing.models import ModelConfig
from plumbing.trackers import LogConfig
from pool import PromptPool, as_context, best_of_run
from rewards import StageConfig, TaskConfig, make_task
from rollout import SamplingConfig

# ----------------------------------------------------------------------------------------------
# Config: one dataclass tree from YAML, checked at start-up. Defaults follow the paper unless a comment says
# why not; `ranges` gives every number its allowed values. A section lives beside the code it configures
# (task: rewards, sampling: rollout, fast: context_opt, model and log: plumbing); train and eval here.

@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # B problems per step -> B*G rollouts
    loss: str = "cispo"  # a key of LOSSES (below): cispo (paper), grpo, dr_grpo, dapo
    lr: float = 1e-5  # (ours) LoRA wants ~10x a full fine-tune's rate; 1e-5 is the paper's range
    warmup_steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping (paper)
    cispo_tau: float = 4.0  # upper truncation of the IS weight; CISPO has no lower clip
    clip_eps: float = 0.2  # grpo / dr_grpo ratio clip, and dapo's lower clip
    dapo_clip_high: float = 0.28  # dapo's "clip-higher"
    kl_coef: float = 0.001  # KL(pi || base) penalty; KL is measured whatever this is
    # (ours) truncated importance sampling for the bf16 sampler-trainer gap (truncated_is); 0 = off
    tis_cap: float = 0.0
    micro_batch: int = 16  # rollouts per forward/backward (memory knob; the math is unchanged)
    logprob_chunk: int = 64  # completion positions per lm_head chunk
    seed: int = 0
    save_every: int = 50  # checkpoint every N steps (and at the end, and on Ctrl-C)
    log_samples: int = 2  # completions per step written to samples.jsonl
    keep_equal_groups: bool = False  # benchmarks: also train on groups whose rewards are all equal, as TRL does

    ranges = {"steps": ">= 1", "batch_size": ">= 1", "lr": "> 0", "warmup_steps": ">= 0", "betas": "[0, 1)",
              "weight_decay": ">= 0", "max_grad_norm": ">= 0", "cispo_tau": "> 0",
              "clip_eps": "(0, 1)",  # the ratio is clipped to [1 - eps, 1 + eps]: 1 - eps must stay > 0
              "dapo_clip_high": "> 0", "kl_coef": ">= 0", "tis_cap": ">= 0", "micro_batch": ">= 1",
              "logprob_chunk": ">= 1", "seed": "any", "save_every": ">= 1", "log_samples": ">= 0"}

    def check(self, prefix: str) -> None:
        """What `ranges` cannot say: the loss is registered, betas is a pair."""
        if self.loss not in LOSSES:
            raise ConfigError(f"config key '{prefix}loss' must be one of {list(LOSSES)}, got {self.loss!r}")
        if len(self.betas) != 2:
            raise ConfigError(f"config key '{prefix}betas' must be two numbers [beta1, beta2], got {self.betas}")


@dataclass
class EvalConfig:
    every: int = 0  # validate every N steps (0 = never during training)
    n: int = 100  # held-out problems per task
    k: int = 4  # samples per problem: mean@k and pass@k

    ranges = {"every": ">= 0", "n": ">= 1", "k": ">= 1"}


@dataclass
class Config:
    mode: Literal["rl", "fst", "gepa"] = "rl"  # rl: the slow loop alone; fst: slow + fast; gepa: fast alone
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda = refuse to start without a GPU
    out_dir: str = "runs"
    run_name: str = ""  # "" = <config>-<mode>-<time>
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fast: FastConfig = field(default_factory=FastConfig)  # the fast loop's settings: context_opt.py
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Continual learning: a list of stages {name: <task>, steps: N, ...}; replaces task/train.steps.
    schedule: list[StageConfig] = field(default_factory=list)
    # Plasticity probe: start from a trained adapter (RUN_DIR or a checkpoint folder), fresh optimiser.
    init_from: str = ""
    init_pool: bool = False  # ...and also take that run's prompt pool


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides -> a checked Config (ConfigError names the bad key)."""
    return config.load_config(Config, path, overrides)


# ----------------------------------------------------------------------------------------------
# The RL math: group advantages, the losses, KL to base.

def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4):
    """rewards [n_groups, G] -> (advantages [n_groups, G], keep [n_groups] bool).
    One group per problem, whatever prompt each rollout used. Groups whose rewards are all equal
    carry no signal and are dropped (keep=False; their advantages are 0)."""
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    if scale_by_std:  # dr_grpo leaves this out: std scaling over-weights easy/hard groups
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    keep = (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
    return adv * keep[:, None], keep


# A loss is one registered per-token function and its normaliser: (mask [R, T], group [R], max_new_tokens,
# total) -> weights [R, T], loss = sum(weights * per_token), made over the whole batch so micro-batches add
# up to the full-batch loss. `total` (Dist.total) sums a count over ranks; `group` and the counts are CPU
# bookkeeping (a 0-dim CPU tensor divides a GPU one).

def per_group_token_mean(mask, group, max_new_tokens, total):
    """Token mean within each group, then mean over groups (CISPO, the paper)."""
    n_groups = total(torch.tensor(float(group.unique().numel()), device="cpu"))
    index = group.to(mask.device)
    tokens_per_group = mask.new_zeros(int(group.max()) + 1 if len(group) else 0).index_add_(0, index, mask.sum(1))
    return mask / tokens_per_group[index][:, None].clamp(min=1) / n_groups


def per_sequence_mean(mask, group, max_new_tokens, total):
    """Mean over each sequence's tokens, then over sequences (GRPO)."""
    return mask / mask.sum(1, keepdim=True).clamp(min=1) / total(torch.tensor(float(mask.shape[0]), device="cpu"))


def constant_normaliser(mask, group, max_new_tokens, total):
    """A constant: max_new_tokens x rows, so no length bias (Dr. GRPO)."""
    return mask / (max_new_tokens * total(torch.tensor(float(mask.shape[0]), device="cpu")))


def per_token_mean(mask, group, max_new_tokens, total):
    """Every token of the batch counts the same (DAPO)."""
    return mask / total(mask.sum()).clamp(min=1)


class Loss(NamedTuple):
    per_token: Callable        # (logp, old_logp, adv [R, 1], mask [R, T], tc: TrainConfig) -> [R, T]
    normaliser: Callable       # see above
    scale_by_std: bool = True  # advantages divided by the group's reward std


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, normaliser: Callable, scale_by_std: bool = True):
    """Decorator: the function becomes train.loss=<name>."""
    def register(per_token):
        LOSSES[name] = Loss(per_token, normaliser, scale_by_std)
        return per_token
    return register


def ppo_clip(ratio, adv, low: float, high: float):
    """-min(rho * A, clip(rho, 1 - low, 1 + high) * A): the PPO surrogate."""
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - low, 1 + high) * adv)


@register_loss("cispo", per_group_token_mean)
def cispo(logp, old_logp, adv, mask, tc):
    """-sg(min(rho, tau)) * A * log pi: every token keeps a gradient; no lower clip."""
    return -torch.clamp(torch.exp(logp - old_logp), max=tc.cispo_tau).detach() * adv * logp


@register_loss("grpo", per_sequence_mean)
@register_loss("dr_grpo", constant_normaliser, scale_by_std=False)  # same surrogate, other normaliser
def grpo(logp, old_logp, adv, mask, tc):
    """Symmetric PPO clip."""
    return ppo_clip(torch.exp(logp - old_logp), adv, tc.clip_eps, tc.clip_eps)


@register_loss("dapo", per_token_mean)
def dapo(logp, old_logp, adv, mask, tc):
    """Asymmetric clip ("clip-higher")."""
    return ppo_clip(torch.exp(logp - old_logp), adv, tc.clip_eps, tc.dapo_clip_high)


def token_weights(loss: str, mask: torch.Tensor, group: torch.Tensor, max_new_tokens: int,
                  batch_total=lambda count: count) -> torch.Tensor:
    """mask [R, T] completion tokens, group [R] group index -> weights [R, T] (the loss's normaliser)."""
    return LOSSES[loss].normaliser(mask.float(), group, max_new_tokens, batch_total)


def policy_loss(tc: TrainConfig, logp, old_logp, adv, mask, weights, base_logp=None, tis_weight=None):
    """logp, old_logp, base_logp, mask, weights, tis_weight: [R, T]; adv: [R]. The scalar loss to minimise:
    tc.loss's per-token loss times tis_weight (train.tis_cap; the KL term has no sampler in it to correct:
    verl, TRL), plus kl_coef x k3 KL to base when kl_coef > 0, weighted and summed."""
    per_token = LOSSES[tc.loss].per_token(logp, old_logp, adv[:, None], mask, tc)
    if tis_weight is not None:
        per_token = per_token * tis_weight
    if tc.kl_coef > 0:
        per_token = per_token + tc.kl_coef * k3_kl(logp, base_logp)
    return (per_token * weights).sum()


def truncated_is(logp, sampler_logp, fresh, cap: float):
    """train.tis_cap > 0: logp, sampler_logp [R, T], fresh [R] bool -> (old_logp, token weight) [R, T]. A fresh
    row's ratio is to the trainer's own log-probs (1) and the sampler-trainer gap is weighted by min(pi_train /
    pi_sampler, cap) (TIS, as verl, TRL); a reused row keeps the sampler's: its lag is the loss's clip's job."""
    own, fresh = logp.detach(), fresh[:, None].to(logp.device)
    weight = (own - sampler_logp).exp().clamp(max=cap)
    return torch.where(fresh, own, sampler_logp), torch.where(fresh, weight, torch.ones_like(weight))


def k3_kl(logp, base_logp):
    """Per-token estimate of KL(pi || base) from tokens sampled from pi: exp(d) - d - 1 with
    d = log base - log pi. Non-negative, unbiased, low variance (Schulman's k3)."""
    d = base_logp - logp
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------------------------
# One training step, in phases: 1-4 make_experience, 5 base_logprobs + mean_kl, 6 update, 7 train_row +
# its samples (RunLog.samples), 8 fast_round_step. `train` below calls them in order; the benchmarks too.

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
    prompt_id: list[int]     # [R] the pool prompt each sample was written under


def plan_rollouts(tok, task, problems: list[dict], pool: PromptPool, group_size: int, seed: int,
                  step: int, first: int = 0) -> RolloutPlan:
    """Step 1: each problem's G rollouts spread over the pool's active contexts (one group each).
    `first`: the batch index of problems[0] (under torchrun a rank plans a slice of the batch), so a
    problem gets the same contexts whichever rank holds it."""
    plan, prompts = RolloutPlan(chats=[], counts=[], group=[], prompt_id=[]), [p for p in pool if p.in_top_k]
    for g, problem in enumerate(problems):
        choice = assign_contexts(len(prompts), group_size,
                                 random.Random(seeds.seed_for("contexts", seed, step, first + g)))
        for k in sorted(set(choice)):
            count = choice.count(k)
            plan.chats.append(rollout.encode_chat(tok, pool.context(prompts[k]).messages(task, problem)))
            plan.counts.append(count)
            plan.group.extend([g] * count)
            plan.prompt_id.extend([prompts[k].id] * count)
    return plan


@dataclass(kw_only=True)
class Experience:
    """One step's rollouts, row-aligned: row r is rollout r (R = B * G rows, each problem's G together)."""
    problems: list[dict]              # the B problems
    group: torch.Tensor               # [R] long: the problem row r answers
    prompt_id: list[int]              # [R] the pool prompt row r was sampled under
    rollouts: rollout.Rollouts        # [R] token ids, sampler log-probs, texts, finish reasons
    scored: list[tuple[float, str]]   # [R] (reward, grader feedback) as the task returned them
    reward: torch.Tensor              # [R] float32
    advantage: torch.Tensor           # [R] one group per problem; 0 in dropped groups
    keep: torch.Tensor                # [B] bool: the group's rewards differ (it carries signal)
    batch: rollout.Batch              # the R rows collated on the device: ids, masks [R, P+T], [R, T]
    sampler_logp: torch.Tensor        # [R, T] the sampler's log-prob of each token (0 on padding): old_logp
    seconds_sampling: float = 0.0
    fresh_rows: int | None = None     # with fast.reuse: rows >= fresh_rows are fast-round rollouts (with_reused)


def make_experience(cfg: Config, run: Run, task, batch: list[dict], step: int) -> Experience:
    """Steps 1-4: plan which pool prompt each rollout uses, sample all B*G completions, score them, compute the
    advantages. Under torchrun each rank does its slice of the problems, with a sampling seed of its own."""
    mine = run.dist.shard(list(range(len(batch))))  # this rank's batch indices (all of them in one process)
    problems = [batch[i] for i in mine]
    plan = plan_rollouts(run.tok, task, problems, run.pool, cfg.sampling.group_size, cfg.train.seed, step, mine[0])
    t0 = time.perf_counter()
    gen = run.dist.generator(run.device, seeds.seed_for("step", cfg.train.seed, step))
    ro = rollout.sample(run.model, run.tok, plan.chats, plan.counts, **cfg.sampling.generation(), generator=gen)
    seconds = time.perf_counter() - t0
    # A scorer that raises gives 0 and says why in the feedback.
    scored = [rewards.score_completion(task, problems[g], text) for g, text in zip(plan.group, ro.texts)]
    return experience_from(problems, plan.group, plan.prompt_id, ro, scored, pad_id=run.tok.pad_token_id,
                           scale_by_std=LOSSES[cfg.train.loss].scale_by_std, device=run.device,
                           seconds_sampling=seconds)


def experience_from(problems, group: list[int], prompt_id: list[int], ro: rollout.Rollouts, scored, *,
                    scale_by_std: bool, pad_id: int, device, seconds_sampling: float = 0.0) -> Experience:
    """Step 4 and the tensors steps 5-6 read: advantages once per problem across all its G rollouts,
    whatever prompt each used; the rows collated; the sampler's log-probs as a [R, T] tensor."""
    reward = torch.tensor([r for r, _ in scored], dtype=torch.float32, device="cpu")  # bookkeeping: CPU
    adv, keep = group_advantages(reward.view(len(problems), -1), scale_by_std=scale_by_std)
    batch, sampler_logp = rollout.collate_rollouts(ro, pad_id, device)
    return Experience(problems=problems, group=torch.tensor(group, device="cpu"), prompt_id=list(prompt_id), rollouts=ro,
                      scored=list(scored), reward=reward, advantage=adv.view(-1), keep=keep, batch=batch,
                      sampler_logp=sampler_logp, seconds_sampling=seconds_sampling)


# Step 4b's data (fast.reuse): the rollouts a fast round scored are the current policy's, so the next steps
# train on them too: kept as records, dealt out over the next steps, joined to a step as extra groups.

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


REUSED_PHASES = {"none": (), "pool": ("pool",), "all": context_opt.ROUND_PHASES}  # by fast.reuse
REUSE_MAX_AGE = 1  # a kept rollout trains once, over the next 2 steps: never more than 1 update old


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
    return rollout.Rollouts(prompt_index=[-1] * len(rows), prompt_ids=[k.prompt_ids for k in rows],
                            completion_ids=[k.completion_ids for k in rows], logprobs=[k.logprobs for k in rows],
                            finish_reasons=[k.finish_reason for k in rows], texts=[k.text for k in rows])


def with_reused(exp: Experience, kept: list[KeptRollout], *, scale_by_std: bool, pad_id: int, device,
                dist: Dist = Dist()) -> Experience:
    """Step 4b (fast.reuse): the step's experience plus the fast round's rollouts due now, as extra groups (a
    problem's rollouts of every context, as FST mixes them); under torchrun each rank takes its share."""
    mine = dist.shard(kept_groups(kept))  # whole groups, by problem
    if not mine:
        return exp
    advantages, keeps = zip(*(group_advantages(torch.tensor([[k.reward for k in g]], device="cpu"), scale_by_std)
                              for g in mine))
    rows = [k for g in mine for k in g]
    joined = exp.rollouts + kept_as_rollouts(rows)  # the kept rows after the step's own
    batch, sampler_logp = rollout.collate_rollouts(joined, pad_id, device)
    first = len(exp.problems)
    return Experience(
        problems=exp.problems + [g[0].problem for g in mine],
        group=torch.cat([exp.group, torch.tensor([first + n for n, g in enumerate(mine) for _ in g], device="cpu")]),
        prompt_id=exp.prompt_id + [k.prompt_id for k in rows], rollouts=joined,
        scored=exp.scored + [(k.reward, k.feedback) for k in rows],
        reward=torch.cat([exp.reward, torch.tensor([k.reward for k in rows], device="cpu")]),
        advantage=torch.cat([exp.advantage, *(a.view(-1) for a in advantages)]),
        keep=torch.cat([exp.keep, *keeps]), batch=batch, sampler_logp=sampler_logp,
        seconds_sampling=exp.seconds_sampling, fresh_rows=len(exp.group))


@torch.no_grad()
def base_logprobs(model, batch: rollout.Batch, micro_batch: int, chunk: int) -> torch.Tensor:
    """Step 5: log p_base of every sampled token, [R, T]: one no-grad pass with the adapter off, in
    micro-batches of rows that share prompts and context prefixes (rollout.micro_batches)."""
    base_logp = torch.zeros_like(batch.completion_mask)
    with rollout.eval_mode(model), model.disable_adapter():
        for rows in rollout.micro_batches(batch, micro_batch):
            base_logp[rows] = rollout.sequence_logprobs(model, batch.rows(rows), chunk)
    return base_logp


def mean_kl(exp: Experience, base_logp: torch.Tensor, total=lambda x: x) -> float:
    """KL(pi || base) per completion token: k3 on the sampled tokens, from the sampler's log-probs.
    `total` (Dist.total) sums the numerator and the token count over ranks."""
    mask = exp.batch.completion_mask
    kl_sum, tokens = total(torch.stack([(k3_kl(exp.sampler_logp, base_logp) * mask).sum(), mask.sum()]))
    return (kl_sum / tokens.clamp(min=1)).item()


@dataclass(kw_only=True)
class UpdateStats:
    """What step 6 did (the defaults: no update, as in gepa mode or when every group was dropped)."""
    loss: float = 0.0              # the full-batch loss (the micro-batches' losses add up to it)
    entropy: float | None = None   # mean per-token entropy of the trained rows; None: none trained
    skipped: str | None = None     # why a guard dropped this update ("non-finite loss", ...)
    rows: int = 0                  # rollouts trained on
    rows_reused: int = 0           # ...of which fast-round rollouts (fast.reuse)
    ratio_dev: float | None = None  # mean |pi/pi_sampler - 1| per trained token: the sampler vs the trainer
    tis_weight: float | None = None  # train.tis_cap: the mean truncated weight over fresh tokens...
    tis_capped: float | None = None  # ...and the share of them it capped


def update(model, optimizer, scheduler, exp: Experience, base_logp: torch.Tensor, tc: TrainConfig,
           max_new_tokens: int, guard: guards.UpdateGuard, step: int, dist: Dist = Dist()) -> UpdateStats:
    """Step 6: one optimiser step on the kept groups' rows (all with tc.keep_equal_groups), in micro-batches
    whose losses add up to the full-batch loss; the guard may skip it or stop the run. Under torchrun each
    rank backpropagates its own rows (maybe none), the gradients are summed, every rank takes the same step."""
    group, mask = exp.group, exp.batch.completion_mask
    train_rows = torch.arange(len(group), device="cpu") if tc.keep_equal_groups else exp.keep[group].nonzero().view(-1)
    if not dist.total(torch.tensor(float(len(train_rows)), device="cpu")):  # no rank has a row to train: no step
        return UpdateStats()
    model.train()
    weights = token_weights(tc.loss, mask[train_rows], group[train_rows], max_new_tokens, batch_total=dist.total)
    optimizer.zero_grad(set_to_none=True)
    loss_value, entropy_sum, ratio_dev_sum, tis = 0.0, 0.0, 0.0, torch.zeros(3, dtype=torch.float64, device="cpu")
    for part in rollout.micro_batches(exp.batch.rows(train_rows), tc.micro_batch):  # indices into train_rows
        rows = train_rows[part]
        logp, ent = rollout.sequence_logprobs(model, exp.batch.rows(rows), tc.logprob_chunk, with_entropy=True)
        sampler_logp = exp.sampler_logp[rows].to(mask.device)  # old_logp, unless truncated_is says otherwise
        fresh = rows < (len(group) if exp.fresh_rows is None else exp.fresh_rows)
        old_logp, tis_weight = sampler_logp, None
        if tc.tis_cap > 0:
            old_logp, tis_weight = truncated_is(logp, sampler_logp, fresh, tc.tis_cap)
        loss = policy_loss(tc, logp, old_logp, exp.advantage[rows].to(mask.device), mask[rows],
                           weights[part].to(mask.device), base_logp=base_logp[rows], tis_weight=tis_weight)
        loss.backward()
        loss_value += loss.item()
        entropy_sum += (ent * mask[rows]).sum().item()
        ratio_dev_sum += ((logp.detach() - sampler_logp).exp() - 1).abs().mul(mask[rows]).sum().item()
        if tis_weight is not None:  # over fresh tokens: the weight's sum, how many it capped, how many
            on = mask[rows] * fresh[:, None].to(mask.device)
            tis += torch.tensor([(tis_weight * on).sum().item(), ((tis_weight >= tc.tis_cap) * on).sum().item(),
                                 on.sum().item()], dtype=torch.float64, device="cpu")
    reused = 0 if exp.fresh_rows is None else int((train_rows >= exp.fresh_rows).sum())
    # The loss, the entropy, the ratios, the tokens and whether any advantage was non-zero, summed over ranks.
    loss_value, entropy_sum, ratio_dev_sum, tokens, signal, n_rows, n_reused, tis_sum, tis_capped, tis_tokens = \
        dist.total(torch.cat([torch.tensor([loss_value, entropy_sum, ratio_dev_sum, mask[train_rows].sum().item(),
                                            float(exp.advantage[train_rows].any()), len(train_rows), reused],
                                           dtype=torch.float64, device="cpu"), tis])).tolist()
    # Gradients summed over ranks, the guards, then (clipped if asked) optimizer.step() and scheduler.step().
    skipped = guard.step(model, optimizer, scheduler, loss_value, step, has_signal=signal > 0,
                         max_grad_norm=tc.max_grad_norm, dist=dist)
    return UpdateStats(loss=loss_value, entropy=entropy_sum / max(tokens, 1.0), skipped=skipped, rows=int(n_rows),
                       rows_reused=int(n_reused), ratio_dev=ratio_dev_sum / max(tokens, 1.0),
                       tis_weight=tis_sum / tis_tokens if tis_tokens else None,
                       tis_capped=tis_capped / tis_tokens if tis_tokens else None)


def train_row(cfg: Config, step: int, task, exp: Experience, kl: float, upd: UpdateStats, lr: float, seconds: dict,
              dist: Dist = Dist()) -> dict:
    """Step 7: the step's metrics.jsonl row from what the phases returned (the loop adds the counters and the
    fast round's time); under torchrun every rank's per-rollout numbers are gathered first."""
    ranks = dist.gather([{"reward": exp.reward.tolist(), "length": exp.batch.completion_mask.sum(1).tolist(),
                          "finish": exp.rollouts.finish_reasons, "keep": exp.keep.tolist(),
                          "prompt_id": exp.prompt_id, "decode_tokens": exp.rollouts.decode_tokens,
                          "seconds_sampling": exp.seconds_sampling}])
    every = lambda key: [x for r in ranks for x in r[key]]  # noqa: E731
    cpu = functools.partial(torch.tensor, device="cpu")  # bookkeeping: the gathered numbers, on the CPU
    reward, lengths, finish = cpu(every("reward")), cpu(every("length")), every("finish")
    keep, prompt_id = cpu(every("keep")), every("prompt_id")
    seconds_sampling = max(r["seconds_sampling"] for r in ranks)  # the slowest rank sets the pace
    return {
        "kind": "train", "step": step, "mode": cfg.mode, "task": task.name,
        "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
        "accuracy": (reward >= 1.0).float().mean().item(), "kl_to_base": kl, "loss": upd.loss, "entropy": upd.entropy,
        "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
        "truncation_rate": sum(f == "length" for f in finish) / len(finish),
        "dropped_group_frac": 1.0 - keep.float().mean().item(), "lr": lr, "update_skipped": upd.skipped,
        "ratio_dev": upd.ratio_dev, "tis_weight": upd.tis_weight, "tis_capped": upd.tis_capped,
        "rows_trained": upd.rows,
        "reused_share": upd.rows_reused / upd.rows if upd.rows else 0.0,  # trained rows from the fast loop
        "seconds_sampling": seconds_sampling, "seconds_base_kl": seconds["seconds_base_kl"],
        "seconds_training": seconds["seconds_training"],
        "tokens_per_s": sum(r["decode_tokens"] for r in ranks) / max(seconds_sampling, 1e-9),
        "reward_by_prompt": {pid: reward[[i for i, p in enumerate(prompt_id) if p == pid]].mean().item()
                             for pid in sorted(set(prompt_id))},
    }


def fast_round_step(cfg: Config, run: Run, task, stream, step: int, log) -> float:
    """Step 8 (fst, gepa; every T steps): evolve the pool on the next T batches' problems (the anchor set); log
    the "fast" row, return its seconds. Under torchrun rank 0's pool is sent to all, so none can drift."""
    t0 = time.perf_counter()
    anchors = [p for b in stream.peek(cfg.fast.every) for p in b]
    gen = run.dist.generator(run.device, seeds.seed_for("fast", cfg.train.seed, step))
    evaluate = context_opt.make_evaluate(run.model, run.tok, task, **cfg.sampling.generation(), generator=gen)
    reflect = context_opt.reflector_for(cfg.fast, run.reflector, run.model, run.tok, generator=gen)
    evaluate, reflect = run.dist.split_round(evaluate, reflect)  # torchrun: each call's items split over ranks
    reflect = runlog.counted(reflect, run.totals, "reflector_calls")
    scored = []  # (context, problem, result) of the phases fast.reuse keeps: RL data for the next steps

    def keep(phase, contexts, problems, results):  # gepa never updates the weights: nothing to train them
        if cfg.mode == "fst" and phase in REUSED_PHASES[cfg.fast.reuse]:
            scored.extend(zip(contexts, problems, results))
    rng = random.Random(seeds.seed_for("fast_choices", cfg.train.seed, step))
    with rollout.eval_mode(run.model), runlog.RoundProgress(step, run.dist.is_main) as progress:
        stats = context_opt.fast_round(run.pool, anchors, cfg.fast, evaluate=evaluate, reflect=reflect, step=step,
                                       rng=rng, demo_buffer=run.demo_buffer, progress=progress, on_rollouts=keep,
                                       task_questions=task.example_questions())
    run.kept = keep_round_rollouts(scored, run.pool, step, REUSE_MAX_AGE)
    if run.dist.is_main:
        tqdm.write(f"[fst] {round_report(stats)}", file=sys.stderr)
    run.totals["rollouts_fast"] += stats["metric_calls"]
    if run.dist.world > 1:
        run.pool = PromptPool.from_json(run.dist.from_main(run.pool.to_json()))
    if run.dist.is_main:
        run.pool.save(run.run_dir / "pool" / f"step_{step:06d}.json")
    log({"kind": "fast", **stats, **run.totals})
    return time.perf_counter() - t0


def round_report(stats: dict) -> str:
    """One line on what a round changed: fast round @ step 6: 12 proposals, 2 accepted (demo, reflect),
    best anchor 0.42 -> 0.50, 95 s."""
    accepted = ", ".join(op for op, n in stats["accepted_by_operator"].items() for _ in range(n))
    return (f"fast round @ step {stats['step']}: {stats['proposals']} proposals, {stats['accepted']} accepted"
            f"{f' ({accepted})' if accepted else ''}, best anchor {stats['best_score_before']:.2f} -> "
            f"{stats['best_score_after']:.2f}, {stats['seconds']:.0f} s")


def validate(cfg: Config, run: Run, step: int, log) -> dict:
    """Held-out accuracy (mean@k, pass@k) of each task in play, seed prompt and pool's best, at `step` updates
    done (0: before training). Returns the last accuracy for the progress bar: {"val_acc": "0.42"}."""
    contexts = {"seed": as_context(run.seed_prompt)}
    if cfg.mode != "rl":
        contexts["best"] = run.pool.context(run.pool.best())
    for name, (task, problems) in run.val_sets.items():
        measured = {}  # the chat a context gives -> its numbers: a best context equal to the seed is measured once
        for which, context in contexts.items():
            key = repr(context.messages(task, problems[0]))
            if key not in measured:
                gen = run.dist.generator(run.device, seeds.seed_for("validation", cfg.train.seed))
                measured[key] = context_opt.measure_accuracy(run.model, run.tok, task, problems, context, k=cfg.eval.k,
                                                             **cfg.sampling.generation(), generator=gen, dist=run.dist)
            acc = measured[key]
            log({"kind": "eval", "step": step, "task": name, "prompt": which, **acc, **run.totals})
    return {"val_acc": f"{acc['accuracy']:.2f}"} if run.val_sets else {}


def validation_due(cfg: Config, steps_done: int, total_steps: int) -> bool:
    """Validation runs before the first step, every eval.every updates and after the last one."""
    return bool(cfg.eval.every) and (steps_done % cfg.eval.every == 0 or steps_done == total_steps)


# ----------------------------------------------------------------------------------------------
# The run: set-up (a fresh run or a resumed one), then the loop.

DEMO_BUFFER = 256  # the last fully rewarded RL rollouts kept as candidate worked examples (demo operators)

@dataclass(kw_only=True)
class Run:
    """What a run carries from step to step: built by start_run, saved by checkpoint()."""
    run_dir: Path
    device: torch.device
    model: Any                  # peft model: the LoRA adapter (trainable) on the base
    tok: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tasks: list                        # one task per stage (one stage unless cfg.schedule)
    streams: list                      # each task's training batches (rewards.ProblemStream)
    stage_ends: list[int]              # the step each stage ends before
    seed_prompt: str
    pool: PromptPool       # the fast weights
    val_sets: dict                     # task name -> (task, held-out problems); {} without eval.every
    guard: guards.UpdateGuard
    dist: Dist = Dist()                # under torchrun: this process's rank and the world size
    totals: dict = field(default_factory=lambda: {"rollouts_rl": 0, "rollouts_fast": 0, "reflector_calls": 0,
                                                  "rollouts_reused": 0})
    demo_buffer: list = field(default_factory=list)  # (problem, completion, reward) for the demo operators
    kept: list = field(default_factory=list)  # KeptRollout: the last fast round's rollouts not yet trained on
    reflector: Any = None              # context_opt.load_reflector's: another model, or an endpoint
    start: int = 0                     # the first step this process runs

    @property
    def total_steps(self) -> int:
        return self.stage_ends[-1]

    def stage(self, step: int):
        """(task, data stream) of `step` (continual learning: the stage it falls in)."""
        i = bisect.bisect_right(self.stage_ends, step)
        return self.tasks[i], self.streams[i]

    def remember(self, exp: Experience):
        """Count the step's rollouts; keep its fully correct answers (not partial credit) as demo candidates,
        every rank's in rank order on every rank (the fast round draws demos on all ranks alike)."""
        demos = [(exp.problems[g], text, r) for g, text, (r, _) in
                 zip(exp.group.tolist(), exp.rollouts.texts, exp.scored) if r >= 1.0]
        ranks = self.dist.gather([(len(exp.rollouts.texts), demos)])
        self.totals["rollouts_rl"] += sum(n for n, _ in ranks)
        self.demo_buffer = (self.demo_buffer + [d for _, part in ranks for d in part])[-DEMO_BUFFER:]

    def checkpoint(self, step: int):
        """Rank 0 saves (every rank holds the same weights, pool and data position)."""
        if self.dist.is_main:
            checkpoints.save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler, self.pool,
                                        {"streams": [s.state_dict() for s in self.streams], "totals": dict(self.totals),
                                         "demo_buffer": self.demo_buffer, "world": self.dist.world,
                                         "kept_rollouts": [dataclasses.asdict(k) for k in self.kept]})

    def restore(self, ckpt: Path):
        """Continue from `ckpt`: optimiser, scheduler, data positions, RNG, pool and counters as saved
        (train's RunLog then drops the log lines written after it)."""
        state = checkpoints.restore_trainer_state(ckpt, self.optimizer, self.scheduler, self.streams)
        self.pool = PromptPool.load(ckpt / "pool.json")
        self.totals, self.demo_buffer, self.start = state["totals"], state["demo_buffer"], state["step"] + 1
        self.kept = [KeptRollout(**k) for k in state["kept_rollouts"]]
        self.dist.say_resumed(ckpt, self.start, saved_world=state["world"])


def make_optimizer(model, tc: TrainConfig):
    """(AdamW over the trainable LoRA weights, linear warm-up to tc.lr then constant)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    warmup = max(1, tc.warmup_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))


def start_run(cfg: Config, run_dir: Path, resume: bool = False, config_name: str = "this config",
              dist: Dist = Dist()) -> Run:
    """Set-up: device, model (a fresh adapter, the run's last checkpoint, or init_from's), tasks and their data
    streams, pool, optimiser; on resume as the checkpoint left them. Every rank builds the same."""
    device = models.pick_device(cfg, config_name)
    ckpt = checkpoints.latest_checkpoint(run_dir, quiet=not dist.is_main) if resume else None  # rank 0 names skips
    init = checkpoints.find_checkpoint(cfg.init_from, what="init_from: ") if cfg.init_from and not ckpt else None
    seeds.seed_everything(seeds.seed_for("init", cfg.train.seed))  # LoRA's A matrices come from the global RNG
    model, tok = models.load_model(cfg.model, device, adapter_path=str(ckpt or init) if (ckpt or init) else None)
    stages = cfg.schedule or [StageConfig(**dataclasses.asdict(cfg.task), steps=cfg.train.steps)]
    tasks = [make_task(s) for s in stages]
    streams = [rewards.ProblemStream(t.load("train"), cfg.train.batch_size,
                                     seeds.seed_for("stream", cfg.train.seed, index=i)) for i, t in enumerate(tasks)]
    seed_prompt = rewards.seed_prompt(tasks[0], cfg.task.system_prompt, continual=bool(cfg.schedule))
    pool = PromptPool(seed_prompt, cfg.fast.demo_format)
    if init and cfg.init_pool and (init / "pool.json").exists():
        pool = PromptPool.load(init / "pool.json")
    val_sets = {t.name: (t, t.load("test")[:cfg.eval.n]) for t in tasks} if cfg.eval.every else {}
    optimizer, scheduler = make_optimizer(model, cfg.train)
    run = Run(run_dir=run_dir, device=device, model=model, tok=tok, optimizer=optimizer, scheduler=scheduler,
              tasks=tasks, streams=streams, stage_ends=list(itertools.accumulate(s.steps for s in stages)),
              seed_prompt=seed_prompt, pool=pool, val_sets=val_sets, guard=guards.UpdateGuard(run_dir), dist=dist,
              reflector=context_opt.load_reflector(cfg.fast, cfg.model, device) if cfg.mode != "rl" else None)
    if ckpt:
        run.restore(ckpt)
    return run


def train(cfg: Config, run_dir: Path, resume: bool = False, config_name: str = "this config",
          dist: Dist = Dist()):
    """The loop: set up (or resume), then per step 1-4 experience, 5 KL to base, 6 update, 7 log,
    8 fast round; validation and checkpoints on their schedules; Ctrl-C saves the last whole step. Under
    torchrun every rank runs it on its slice of each batch, sums where numbers are made; rank 0 writes."""
    run, val = start_run(cfg, run_dir, resume, config_name, dist), {}
    with runlog.RunLog(run_dir, cfg.log, dataclasses.asdict(cfg), run.start, dist.is_main,
                       on_close=functools.partial(runlog.print_summary, run_dir, best_of_run)) as log, \
            guards.checkpoint_on_interrupt(run.checkpoint, run_dir, (rollout.NonFiniteLogits,)) as progress:
        # Before the first step; on resume, the validation a crash cut off after its step's checkpoint.
        if validation_due(cfg, run.start, run.total_steps) and not runlog.logged(run_dir, "eval", run.start):
            val = validate(cfg, run, run.start, log.row)
        bar = tqdm(range(run.start, run.total_steps), initial=run.start, total=run.total_steps, desc=cfg.mode,
                   disable=not dist.is_main)
        for step in bar:
            t_step, seconds = time.perf_counter(), {}
            task, stream = run.stage(step)  # continual learning: the task of this step
            progress.undo = functools.partial(stream.load_state_dict, stream.state_dict())  # Ctrl-C un-reads
            seeds.seed_everything(seeds.seed_for("step", cfg.train.seed, step))  # resume == uninterrupted
            lr = run.optimizer.param_groups[0]["lr"]

            # 1-4. B problems x G rollouts over the pool's prompts: sampled, scored, advantages per problem
            # (under torchrun: this rank's slice of the B problems; the rest of the step sums over ranks).
            exp = make_experience(cfg, run, task, stream.next_batch(), step)
            run.remember(exp)  # the rollout count and the demo buffer
            # 4b. fast.reuse: the last fast round's rollouts due at this step join as extra groups.
            due, run.kept = due_rollouts(run.kept, step, REUSE_MAX_AGE)
            trained = with_reused(exp, due, scale_by_std=LOSSES[cfg.train.loss].scale_by_std,
                                  pad_id=run.tok.pad_token_id, device=run.device, dist=dist) if due else exp

            # 5. KL to base on every rollout: the sampler's log-probs vs one no-grad pass, adapter off
            # (the step's KL metric: its own rollouts, the first rows).
            with runlog.timed(seconds, "seconds_base_kl"):
                base_logp = base_logprobs(run.model, trained.batch, cfg.train.micro_batch, cfg.train.logprob_chunk)
                kl = mean_kl(exp, base_logp[:len(exp.group), :exp.sampler_logp.shape[1]], dist.total)

            # 6. The update (not in gepa mode): the loss over the kept groups, in micro-batches, guarded.
            with runlog.timed(seconds, "seconds_training"):
                upd = (update(run.model, run.optimizer, run.scheduler, trained, base_logp, cfg.train,
                              cfg.sampling.max_new_tokens, run.guard, step, dist)
                       if cfg.mode != "gepa" else UpdateStats())
            run.totals["rollouts_reused"] += upd.rows_reused

            # 7. Log: the metrics row (written after step 8, whose counters it includes), a few samples.
            row = train_row(cfg, step, task, exp, kl, upd, lr, seconds, dist)
            log.samples(exp, step, cfg.train.log_samples)  # samples.jsonl: a few completions and their feedback

            # 8. The fast loop (fst, gepa): every T steps, evolve the pool on the next T batches.
            due = cfg.mode != "rl" and (step + 1) % cfg.fast.every == 0
            t_fast = fast_round_step(cfg, run, task, stream, step, log.row) if due else 0.0

            row.update(run.totals, seconds_fast=t_fast, seconds_step=time.perf_counter() - t_step)
            dist.check_same(f"the adapter or the prompt pool after step {step}",
                            lambda: torchrun.fingerprint(run.model, run.pool))  # torchrun only: an all-gather
            with guards.interrupt_held():  # Ctrl-C waits: the log line and the step's completion land together
                log.row(row)
                progress.done, progress.undo = step, None  # the step's update, fast round and log line are in
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", kl=f"{kl:.4f}", **val,
                            s_step=f"{row['seconds_step']:.1f}")
            if (step + 1) % cfg.train.save_every == 0 or step + 1 == run.total_steps:
                run.checkpoint(step)  # before its validation: a validation that fails loses no step
            if validation_due(cfg, step + 1, run.total_steps):
                val = validate(cfg, run, step + 1, log.row)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Command line.

def expandable_segments() -> None:
    """Expandable segments (KV caches of many sizes strand fixed ones) unless the user set the allocator;
    read when CUDA starts, so main calls this first."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv=None):
    expandable_segments()
    args = startup.command_line(argv, description=__doc__)  # --config/--resume, --set, --plan, --help-config
    if startup.answered_without_a_run(args, Config, load_config):
        return
    dist = torchrun.init_distributed()  # torchrun: join the other ranks (every rank runs all of main)
    cfg, run_dir, config_name = startup.start_up(args, dist, load_config, make_task)
    if cfg.mode != "rl" and cfg.fast.on_endpoint():  # before the run folder: a wrong URL or model stops here
        context_opt.reflector_endpoint(cfg.fast).probe()
    runlog.make_run_folder(run_dir, dataclasses.asdict(cfg), dist)
    finished = False
    try:
        train(cfg, run_dir, resume=bool(args.resume), config_name=config_name, dist=dist)
        finished = True
    except (guards.TrainingError, rollout.NonFiniteLogits) as e:
        raise SystemExit(f"training error: {e}")
    finally:
        dist.close(finished)


if __name__ == "__main__":
    main()
