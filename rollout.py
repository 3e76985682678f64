"""rollout.py -- one job: sample groups of completions fast and score token log-probs (both loops use it).

sample():  each distinct prompt is prefilled ONCE (left-padded batch), its KV cache rows are repeated
           for its samples, then one token per live row per step; rows that finish leave the batch.
sequence_logprobs(): the decoder body (each distinct prompt once, its KV cache expanded to its rows, then
           the completion columns; one plain pass when nothing is shared), then lm_head + log_softmax in
           checkpointed chunks over time, so a full [R, T, V] float32 tensor never exists (V ~ 50-150k
           makes that the memory peak).
Both share more than whole prompts: prompts that begin with the same long prefix (FST: one of K
contexts, a few hundred tokens, then a short problem) run that prefix once, and each prompt then runs
only its own suffix on top of the prefix's cache rows (plan_prefixes, _prefill_prompts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


# The config's `sampling` section (fst.Config.sampling): how every rollout of a run is sampled.
@dataclass
class SamplingConfig:
    group_size: int = 8  # G rollouts per problem
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # extra stop strings besides EOS
    # (ours) rows one sampler call decodes at once; a call with more (validation: n x k) runs in waves.
    # The memory knob of sampling: its KV cache is rows x (prompt + new tokens) (`fst.py --plan`).
    max_rows: int = 256

    ranges = {"group_size": ">= 2",  # a group of one has no variance: every group would be dropped
              "max_new_tokens": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]",  # temperature 0 = greedy
              "max_rows": ">= 1"}

    def generation(self) -> dict:
        """The keywords rollout.sample takes, as every rollout of the run is sampled."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "max_rows": self.max_rows}


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside the block, the model's own mode back after it (also on errors): train mode turns
    on dropout, and gradient checkpointing silently drops the KV cache."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def weights(model, use_adapter: bool):
    """Context: the trained policy (adapter on), or the frozen base weights (peft's disable_adapter:
    the reference model and the default critic, at no extra memory). A model without LoRA runs as is."""
    if use_adapter or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


def encode_chat(tokenizer, messages) -> list[int]:
    """Chat messages -> prompt token ids ending with the assistant generation prompt. Thinking is off
    where the template has the switch (Qwen3's `enable_thinking`; other templates ignore the variable):
    a thinking reply would spend max_new_tokens before its answer."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, enable_thinking=False)
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


# ------------------------------------------------------------------------------ shared prompt prefixes
# Prompts that begin alike run in two passes: each distinct prefix once, its KV cache rows repeated for
# the prompts that start with it, then each prompt's own suffix on top. A second pass has a fixed cost
# (and a GPU runs a short prefill at about the price of a long one), so prompts share a prefix only from
# this many tokens on. Set it above any prompt's length (sys.maxsize) to turn sharing off in a whole run.
MIN_SHARED_PREFIX = 64


class PrefixPlan(NamedTuple):
    """How U distinct prompts are prefilled: Q prefix rows, each run once, then each prompt's suffix."""
    prefixes: list[list[int]]   # [Q] a prefix shared by >= 2 prompts, or a whole prompt that shares none
    prefix_of: list[int]        # [U] the prefix row prompt u begins with
    suffixes: list[list[int]]   # [U] prompt u after its prefix; [] when its prefix row is all of it

    @classmethod
    def unshared(cls, prompts: list[list[int]]) -> PrefixPlan:
        """Today's path: every prompt is its own prefix row and no suffix pass runs."""
        return cls([list(p) for p in prompts], list(range(len(prompts))), [[] for _ in prompts])

    @property
    def shares(self) -> bool:
        # a prefix row shared by >= 2 distinct prompts leaves a suffix to at least one of them
        return any(self.suffixes)

    def padded_tokens(self) -> int:
        """Token columns the passes compute, padding included: Q x the longest prefix + U x the longest suffix."""
        return (len(self.prefixes) * max(map(len, self.prefixes))
                + len(self.suffixes) * max(map(len, self.suffixes)))


def _common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan_prefixes(prompts: list[list[int]]) -> PrefixPlan:
    """Split distinct prompts into shared prefixes and own suffixes so that the most prompt tokens are
    computed once. Sorted, prompts that share a prefix sit together; a dynamic programme cuts the sorted
    list into runs, a run of n prompts sharing L >= MIN_SHARED_PREFIX tokens saving (n - 1) * L (contexts
    that begin alike thus get a prefix row each, not one short common one). The unshared plan when no run
    saves anything, or when padding to the longest prefix and suffix would cost more than it saves."""
    unshared = PrefixPlan.unshared(prompts)
    U = len(prompts)
    order = sorted(range(U), key=lambda u: prompts[u])
    common = [_common_length(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]    # [U-1]
    # saved[j]: the most tokens saved by cutting order[:j] into runs; start[j]: where its last run starts
    saved, start = [0] * (U + 1), list(range(U + 1))
    for j in range(1, U + 1):
        saved[j], start[j] = saved[j - 1], j - 1                  # order[j-1] in a run of its own
        shared = float("inf")
        for i in range(j - 2, -1, -1):                            # the run order[i:j], growing leftwards
            shared = min(shared, common[i])
            if shared < max(1, MIN_SHARED_PREFIX):
                break                                             # a longer run shares even less
            if saved[i] + (j - i - 1) * shared > saved[j]:
                saved[j], start[j] = saved[i] + (j - i - 1) * shared, i
    if saved[U] == 0:
        return unshared
    runs, j = [], U
    while j > 0:
        runs.append(order[start[j]:j])
        j = start[j]
    prefixes, prefix_of, suffixes = [], [0] * U, [[] for _ in range(U)]
    for run in reversed(runs):
        # sorted, so the first and last prompt of a run share what all of it shares (a run of one: all of it)
        n = _common_length(prompts[run[0]], prompts[run[-1]])
        for u in run:
            prefix_of[u], suffixes[u] = len(prefixes), list(prompts[u][n:])
        prefixes.append(list(prompts[run[0]][:n]))
    plan = PrefixPlan(prefixes, prefix_of, suffixes)
    return plan if plan.padded_tokens() < unshared.padded_tokens() else unshared


class Prefilled(NamedTuple):
    """What a prefill hands to the next phase (the KV cache itself is extended in place)."""
    last: torch.Tensor   # [U, D] the forward's output at each prompt's last token (logits or hidden state)
    mask: torch.Tensor   # [U, A+S] the cache's columns: 1 on real tokens (prefix, then suffix), 0 on padding
    tokens: int          # real tokens run through the model (a shared prefix counts once)


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [n, W], mask [n, W]), right-aligned to the longest row W."""
    W = max(map(len, rows))
    ids = torch.tensor([[pad] * (W - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (W - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _repeat_cache_rows(cache, index: torch.Tensor) -> None:
    """cache row i <- row index[i] in every layer, by index_select, whose backward sums repeated rows'
    gradients in a fixed order (batch_select_indices' [index] sums them in an order that varies on a
    multi-threaded CPU, so a resumed run would not replay its training pass)."""
    for layer in cache.layers:
        if isinstance(layer, _GrowingLayer):
            layer.batch_select_indices(index)
        elif layer.get_seq_length() > 0:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def _prefill_prompts(forward, cache, plan: PrefixPlan, pad: int, device) -> Prefilled:
    """Prefill `plan`'s prompts into `cache`: the prefix rows (left-padded to A), repeated for the prompts
    that begin with them, then every prompt's suffix (left-padded to S) on top. forward(ids, mask, pos)
    runs new columns (mask covers the cached ones too) and returns the last column's output."""
    ids, mask = _left_pad(plan.prefixes, pad, device)                                       # [Q, A]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's first token is position 0
    last = forward(ids, mask, pos)                                                          # [Q, D]
    tokens = int(mask.sum())
    if plan.prefix_of != list(range(len(plan.prefixes))):  # prompts share prefix rows: repeat them
        of = torch.tensor(plan.prefix_of, device=device)
        _repeat_cache_rows(cache, of)
        last, mask = last.index_select(0, of), mask[of]                                     # [U, .]
    if not plan.shares:
        return Prefilled(last, mask, tokens)
    # The suffixes sit right after the prefix columns, left-padded: a prompt's pads lie between its
    # prefix and its suffix, masked out, and its positions go on from its prefix's real length.
    sids, smask = _left_pad(plan.suffixes, pad, device)                                    # [U, S]
    spos = mask.sum(-1, keepdim=True) + (smask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([mask, smask], dim=1)                                                  # [U, A+S]
    slast = forward(sids, mask, spos)                                                       # [U, D]
    # A prompt that is all prefix (empty suffix: its last column is padding) keeps the prefix pass's output.
    has_suffix = smask[:, -1:].bool()                                                       # [U, 1]
    return Prefilled(torch.where(has_suffix, slast, last), mask, tokens + int(smask.sum()))


# ----------------------------------------------------------------------------------------- sampling
@dataclass
class Rollouts:
    """R samples, grouped by input prompt in input order (prompt 0's counts[0] samples first)."""
    prompt_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)   # includes EOS when emitted
    logprobs: list[list[float]] = field(default_factory=list)       # log p(token), temperature 1
    finish_reasons: list[str] = field(default_factory=list)         # "eos" | "stop" | "length"
    texts: list[str] = field(default_factory=list)                  # cut right after a stop string
    prefill_tokens: int = 0                                         # prompt tokens run (shared ones once)
    decode_tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: Rollouts) -> Rollouts:
        """The rows of both, self's first; the counters (tokens run, seconds) add up."""
        rows = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        return Rollouts(**rows)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    return {int(i) for i in ids if i is not None}


def _pick(logp: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None) -> torch.Tensor:
    """logp [B, V] float32 log-softmax, u [B] uniforms in [0, 1) -> token ids [B]: greedy (u unused), or
    temperature + nucleus sampling by inverting the CDF at u (torch.multinomial draws an exponential per
    vocabulary entry, most of a CPU decode step at V ~ 50k; a full sort for top-p is worse)."""
    if temperature == 0:
        return logp.argmax(-1)
    # p^(1/T) in float64, the row's max off first: it underflows at low T, a float32 sum strays from logp
    z = logp * (1.0 / temperature)
    w = (z - z.amax(-1, keepdim=True)).double().exp_()                                       # [B, V]
    idx = None
    if top_p < 1.0:
        w = w / w.sum(-1, keepdim=True)
        k = 64  # the nucleus is usually small: sort only the top k, widen until it holds top_p mass
        while True:
            vals, idx = w.topk(min(k, w.shape[-1]), dim=-1)          # [B, k] descending
            if k >= w.shape[-1] or bool((vals.sum(-1) >= top_p).all()):
                break
            k *= 4
        w = vals.masked_fill(vals.cumsum(-1) - vals >= top_p, 0.0)   # keep until mass reaches top_p
    cdf = w.cumsum(-1)
    u = u.to(cdf.device, cdf.dtype)[:, None]                                                  # [B, 1]
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (tok if idx is None else idx.gather(-1, tok)).squeeze(-1)


class NonFiniteLogits(RuntimeError):
    """The model returned NaN or inf logits: sampling from them would give garbage tokens silently."""


def _check_finite(logp: torch.Tensor, step: int) -> None:
    """Stop a call whose logits are not finite (some fused attention kernels return NaN on a left-padded
    row whose query sees only padding, and NaN spreads through attention to the real rows)."""
    bad = logp.isnan().any(-1)  # NaN or +inf logits give NaN here; -inf is a token of probability 0  # [B]
    if bool(bad.any()):
        raise NonFiniteLogits(f"non-finite logits in {int(bad.sum())} of {len(bad)} rows at new token {step} "
                              f"of a sampler call (a NaN from the attention kernel on padded rows is the usual "
                              f"cause: try model.attn=sdpa, or model.dtype=float32 to rule out overflow)")


def _cut_at_stop(text: str, stop) -> str:
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into spare capacity (grown in blocks) instead of
    torch.cat-ing the whole cache every step: on CPU that copy cost as much as the matmuls."""
    block = 128

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.n, self.kbuf, self.vbuf = 0, key_states[..., :0, :], value_states[..., :0, :]
        n, q = self.n, key_states.shape[-2]
        if n + q > self.kbuf.shape[-2]:  # [B, heads, capacity, head_dim]
            grow = lambda buf, new: torch.cat([buf[..., :n, :], new.new_empty(
                *new.shape[:2], q + self.block, new.shape[-1])], dim=-2)
            self.kbuf, self.vbuf = grow(self.kbuf, key_states), grow(self.vbuf, value_states)
        self.kbuf[..., n:n + q, :] = key_states
        self.vbuf[..., n:n + q, :] = value_states
        self.n = n + q
        self.keys, self.values = self.kbuf[..., :self.n, :], self.vbuf[..., :self.n, :]  # views
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.kbuf, self.vbuf = self.kbuf.index_select(0, indices), self.vbuf.index_select(0, indices)
            self.keys, self.values = self.kbuf[..., :self.n, :], self.vbuf[..., :self.n, :]


def _new_cache(model) -> DynamicCache:
    """Growing layers when every layer is plain full attention; otherwise (sliding windows, linear
    attention, ...) the model's own DynamicCache layout."""
    cache = DynamicCache(config=model.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_GrowingLayer() for _ in cache.layers]
        if cache.layer_class_to_replicate is not None:
            cache.layer_class_to_replicate = _GrowingLayer
    return cache


@torch.inference_mode()
def sample(model, tokenizer, prompts: list[list[int]], counts: list[int], *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, stop=(), generator: torch.Generator | None = None,
           batch_size: int | None = None, max_rows: int | None = None, progress: bool = False,
           share_prefix: bool = True) -> Rollouts:
    """Sample counts[i] completions of prompts[i] (token ids); temperature 0 = greedy. A call over
    batch_size prompts or max_rows rows (the memory knob: KV cache = rows x tokens) runs in waves (None:
    all at once), which give the same samples (row_uniforms). share_prefix: prompts sharing
    MIN_SHARED_PREFIX or more leading tokens prefill them once (plan_prefixes), with the same samples as without."""
    assert len(prompts) == len(counts), "one count per prompt"
    start, out = time.perf_counter(), Rollouts()
    opts = dict(eos=_eos_ids(model, tokenizer), max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, stop=[s for s in stop if s], progress=progress, share_prefix=share_prefix)
    uniforms = row_uniforms(sum(counts), max_new_tokens, temperature, generator)
    with eval_mode(model):
        row = 0
        for wave in sampling_waves(prompts, counts, batch_size, max_rows):
            rows = sum(wave.counts)
            _sample_wave(model, tokenizer, wave.prompts, wave.counts, wave.first, out,
                         uniforms=None if uniforms is None else uniforms[row:row + rows], **opts)
            row += rows
    out.seconds = time.perf_counter() - start
    return out


def row_uniforms(rows: int, max_new_tokens: int, temperature: float, generator) -> torch.Tensor | None:
    """The call's randomness up front, [rows, max_new_tokens] (None when greedy): row r's t-th token is
    drawn at [r, t] whatever wave it runs in and whichever rows finish beside it. On the generator's device
    (a CPU generator may drive a GPU model)."""
    if temperature == 0 or rows == 0:
        return None
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(rows, max_new_tokens, generator=generator, device=device)


class Wave(NamedTuple):
    """One wave of a sample() call: its prompts, consecutive in the call from index `first`."""
    first: int
    prompts: list
    counts: list[int]


def sampling_waves(prompts: list, counts: list[int], batch_size: int | None = None,
                   max_rows: int | None = None) -> list[Wave]:
    """The waves a sample() call runs, in order, at most batch_size prompts and max_rows rows each; a prompt
    with more samples than max_rows is split over waves, its samples in order."""
    waves, prompt_cap, row_cap = [], batch_size or len(prompts) or 1, max_rows or sum(counts) or 1
    cur: Wave | None = None
    for i, (p, c) in enumerate(zip(prompts, counts)):
        while True:  # a prompt of count 0 still takes its place, so a wave's prompt indices stay consecutive
            if cur is None or len(cur.prompts) >= prompt_cap or (c > 0 and sum(cur.counts) >= row_cap):
                cur = Wave(i, [], [])
                waves.append(cur)
            take = min(c, row_cap - sum(cur.counts))
            cur.prompts.append(p)
            cur.counts.append(take)
            c -= take
            if c == 0:
                break
    return waves


def _sample_wave(model, tokenizer, prompts, counts, offset, out, *, uniforms, eos, max_new_tokens, temperature,
                 top_p, stop, progress, share_prefix):
    """Sample counts[i] completions of each prompts[i] into `out` in sample order, in the four phases below
    (`offset`: this wave's first prompt index in the whole sample() call)."""
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

    # 1. Rows = samples in output order; row_src[r] = the distinct prompt that row r continues.
    distinct: dict[tuple, int] = {}
    row_prompt, row_src = [], []
    for i, (p, c) in enumerate(zip(prompts, counts)):
        for _ in range(c):
            row_prompt.append(offset + i)
            row_src.append(distinct.setdefault(tuple(p), len(distinct)))
    if not row_src:
        return

    # 2. Prefill each distinct prompt once; repeat its cache rows for its samples.
    cache, logits, mask = _prefill(model, [list(p) for p in distinct], row_src, pad, device, out, share_prefix)

    # 3. Decode one token per live row per step; a row leaves the batch at EOS or a stop string.
    comp, lps, reason = _decode(model, tokenizer, cache, logits, mask, out, eos=eos, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stop=stop, uniforms=uniforms,
                                progress=progress)

    # 4. Collect the rows into `out`, in sample order.
    for r in range(len(row_src)):
        text = tokenizer.decode(comp[r], skip_special_tokens=True)
        out.prompt_index.append(row_prompt[r])
        out.prompt_ids.append(list(prompts[row_prompt[r] - offset]))
        out.completion_ids.append(comp[r])
        out.logprobs.append(lps[r])
        out.finish_reasons.append(reason[r])
        out.texts.append(_cut_at_stop(text, stop) if reason[r] == "stop" else text)


def _prefill(model, uniq: list[list[int]], row_src: list[int], pad: int, device, out: Rollouts,
             share_prefix: bool):
    """The distinct prompts `uniq` -> (KV cache with one row per sample, next-token logits [R, V],
    attention mask [R, L] of the cached columns); row r continues prompt uniq[row_src[r]]. Prompts that
    share a long prefix run it once (plan_prefixes); otherwise one left-padded forward (L = P)."""
    cache = _new_cache(model)
    # Suffixes on top of repeated prefix rows need plain full-attention layers (see _can_share_prompts).
    growing = all(type(layer) is _GrowingLayer for layer in cache.layers)
    plan = plan_prefixes(uniq) if share_prefix and growing else PrefixPlan.unshared(uniq)

    def forward(ids, mask, pos):  # new columns [n, c] on top of the cache -> next-token logits [n, V]
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1]

    done = _prefill_prompts(forward, cache, plan, pad, device)
    out.prefill_tokens += done.tokens
    src = torch.tensor(row_src, device=device)
    if len(row_src) != len(uniq):  # the shared prefill: repeat each prompt's cache rows for its samples
        cache.batch_select_indices(src)
    return cache, done.last[src], done.mask[src]                                              # [R, .]


def _decode(model, tokenizer, cache, logits, mask, out: Rollouts, *, eos, max_new_tokens, temperature, top_p,
            stop, uniforms, progress):
    """One token per live row per step from the prefilled `cache`; finished rows leave the batch, so
    later steps compute live rows only. Returns per row: token ids, their log-probs, finish reason.
    uniforms [R, max_new_tokens] (None: greedy): row r's t-th token is drawn at uniforms[r, t]."""
    device, R = mask.device, mask.shape[0]
    u = None if uniforms is None else uniforms.to(device)                                     # [R, N]
    next_pos = mask.sum(-1, keepdim=True)                                                     # [R, 1]
    comp, lps, reason = [[] for _ in range(R)], [[] for _ in range(R)], ["length"] * R
    live = list(range(R))  # live[b] = output row of batch row b
    # A stop string completed by the newest token lies within its last (bytes + margin) tokens,
    # since every non-special token decodes to >= 1 byte; decode only that tail per step.
    tail = max((len(s.encode()) for s in stop), default=0) + 4
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_new_tokens, desc="decode", leave=False)
    for step in range(max_new_tokens):
        logp = logits.float().log_softmax(-1)  # the raw distribution (temperature 1)        # [B, V]
        _check_finite(logp, step)
        tok = _pick(logp, temperature, top_p, None if u is None else u[:, step])             # [B]
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)                                        # [B]
        out.decode_tokens += len(live)
        keep = []
        for b, (r, t, l) in enumerate(zip(live, tok.tolist(), lp.tolist())):
            comp[r].append(t)
            lps[r].append(l)
            if t in eos:
                reason[r] = "eos"
            elif stop and any(s in tokenizer.decode(comp[r][-tail:], skip_special_tokens=True) for s in stop):
                reason[r] = "stop"
            else:
                keep.append(b)
        if bar is not None:
            bar.update()
            bar.set_postfix(live=len(keep), refresh=False)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            k = torch.tensor(keep, device=device)
            cache.batch_select_indices(k)
            tok, mask, next_pos = tok[k], mask[k], next_pos[k]
            u = None if u is None else u[k]
            live = [live[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)                          # [B, L+1]
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                       past_key_values=cache, use_cache=True).logits[:, -1]                   # [B, V]
        next_pos = next_pos + 1
    if bar is not None:
        bar.close()
    return comp, lps, reason


# ---------------------------------------------------------------------------------------- log-probs
@dataclass
class Batch:
    input_ids: torch.Tensor        # [R, P+T]  prompts LEFT-padded to P, completions RIGHT-padded to T
    attention_mask: torch.Tensor   # [R, P+T]
    completion_mask: torch.Tensor  # [R, T] float, 1 on real completion tokens
    prompt_width: int              # P: every completion starts at column P

    def rows(self, rows: torch.Tensor) -> Batch:
        """The sub-batch of `rows` (e.g. one micro-batch), with the same columns."""
        rows = rows.to(self.input_ids.device)
        return Batch(input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                     completion_mask=self.completion_mask[rows], prompt_width=self.prompt_width)


def collate(prompt_ids, completion_ids, pad_id: int, device=None) -> Batch:
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(c) for c in completion_ids))  # >= 1 so shapes stay non-empty
    ids, att, cm = [], [], []
    for p, c in zip(prompt_ids, completion_ids):
        ids.append([pad_id] * (P - len(p)) + list(p) + list(c) + [pad_id] * (T - len(c)))
        att.append([0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (T - len(c)))
        cm.append([1.0] * len(c) + [0.0] * (T - len(c)))
    return Batch(torch.tensor(ids, device=device), torch.tensor(att, device=device),
                 torch.tensor(cm, device=device), P)


def collate_rollouts(ro: Rollouts, pad_id: int, device) -> tuple[Batch, torch.Tensor]:
    """The rows collated on the device, and the sampler's log-probs as [R, T] (0 on padding)."""
    batch = collate(ro.prompt_ids, ro.completion_ids, pad_id, device)
    width = batch.completion_mask.shape[1]
    sampler_logp = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in ro.logprobs], dtype=torch.float32,
                                device=batch.completion_mask.device)  # [R, T]: one transfer, not a row each
    return batch, sampler_logp


def _shared_prompt_groups(batch: Batch):
    """(distinct prompt rows [U], row -> distinct index [R]) when some rows share a prompt, else None.
    Rows are compared on their left-padded prompt ids AND mask (a prompt starting with the pad id
    must not match a shorter one)."""
    P, R = batch.prompt_width, batch.input_ids.shape[0]
    if P == 0 or R < 2:
        return None
    key = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P].to(batch.input_ids.dtype)], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(uniq) == R:
        return None
    first = torch.full((len(uniq),), R, dtype=torch.long, device=key.device)  # a representative row each
    first.scatter_reduce_(0, inverse, torch.arange(R, device=key.device), reduce="amin")
    return first, inverse


def checkpointing_on(body) -> bool:
    """Whether the decoder's layers checkpoint activations (transformers' `is_activation_checkpointing`, before
    5.x `is_gradient_checkpointing`); a model with neither counts as checkpointing: the always-right single pass."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(body), name, None), property):
            with warnings.catch_warnings():  # the old name warns that it is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                return bool(getattr(body, name))
    return True


def _can_share_prompts(body) -> bool:
    """The two-pass path needs the decoder to honour past_key_values: HF drops the cache in layers that
    checkpoint (gradient checkpointing + train mode), and only plain full-attention DynamicLayers are
    known to expand and extend correctly (sliding windows / linear attention: use the single pass)."""
    if body.training and checkpointing_on(body):
        return False
    try:
        cache = DynamicCache(config=body.config)
    except Exception:
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _prompt_tokens(batch: Batch, rows: torch.Tensor | None = None) -> list[list[int]]:
    """The real prompt tokens of `rows` (default: all rows), without their left padding."""
    P = batch.prompt_width
    ids, mask = batch.input_ids[:, :P], batch.attention_mask[:, :P].bool()
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def micro_batches(batch: Batch, size: int) -> list[torch.Tensor]:
    """The row indices of `batch` in micro-batches of at most `size` rows, sorted by prompt tokens so that rows
    sharing a prompt or context prefix run it once in one pass (a row's log-probs do not depend on its company)."""
    prompts = _prompt_tokens(batch)
    order = sorted(range(len(prompts)), key=prompts.__getitem__)  # stable: ties keep their row order
    # CPU bookkeeping (Batch.rows moves them); no rows, no micro-batch: a 0-row forward raises.
    return list(torch.tensor(order, dtype=torch.long, device="cpu").split(size)) if order else []


def completion_hidden_states(model, batch: Batch, share_prompts: bool = True,
                             share_prefix: bool = True) -> torch.Tensor:
    """Final hidden states at the positions that predict completion tokens (columns P-1 .. P+T-2), from the
    decoder body alone (get_decoder() reaches through peft; LoRA stays active). share_prompts: each distinct
    prompt runs once, its KV cache expanded to its rows (differentiably), the completions on top;
    share_prefix: a long prefix common to several prompts runs once too (plan_prefixes). One pass over
    [R, P+T] when nothing is shared or the decoder cannot use a cache (_can_share_prompts)."""
    body = model.get_decoder()
    P, T = batch.prompt_width, batch.completion_mask.shape[1]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    groups = plan = None
    if share_prompts and _can_share_prompts(body) and P > 0 and len(pos) > 1:
        groups = _shared_prompt_groups(batch)       # (first [U], inverse [R]) or None: all rows differ
        first = groups[0] if groups is not None else None
        prompts = _prompt_tokens(batch, first)                                                # [U]
        plan = plan_prefixes(prompts) if share_prefix else PrefixPlan.unshared(prompts)
    if groups is None and (plan is None or not plan.shares):
        h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                 use_cache=False).last_hidden_state                                          # [R, P+T, H]
        return h[:, P - 1:P - 1 + T]                                                          # [R, T, H]

    cache = DynamicCache(config=body.config)  # plain torch.cat layers: autograd sees every update

    def forward(ids, mask, cols):  # new columns [n, c] on top of the cache -> last hidden state [n, H]
        return body(input_ids=ids, attention_mask=mask, position_ids=cols, past_key_values=cache,
                    use_cache=True).last_hidden_state[:, -1]

    done = _prefill_prompts(forward, cache, plan, pad=0, device=pos.device)  # pad: any id, it is masked
    h0 = done.last[:, None]                                   # [U, 1, H]: each prompt's last position
    if groups is not None:  # [U, ...] -> [R, ...] by indexing, so grads sum back per prompt
        h0 = h0.index_select(0, groups[1])
    if T == 1:
        return h0                                                                             # [R, 1, H]
    mask = done.mask                                                                          # [U, L]
    if groups is not None:
        _repeat_cache_rows(cache, groups[1])
        mask = mask[groups[1]]                                                                # [R, L]
    # The last completion column predicts nothing, so columns P .. P+T-2 suffice; their mask covers the
    # L cached prompt columns (laid out as the prefill left them), then the completion's own.
    mask = torch.cat([mask, batch.attention_mask[:, P:P + T - 1]], dim=1)
    hc = body(input_ids=batch.input_ids[:, P:P + T - 1], attention_mask=mask, position_ids=pos[:, P:P + T - 1],
              past_key_values=cache, use_cache=True).last_hidden_state                       # [R, T-1, H]
    return torch.cat([h0, hc], dim=1)                                                         # [R, T, H]


def _chunk_logprobs(lm_head, h, y, with_entropy: bool):
    """h [R, c, H], y [R, c] -> log p(y) [R, c] (and entropy [R, c]); logits live only in here."""
    logits = lm_head(h).float()                                                               # [R, c, V]
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, y[..., None]).squeeze(-1) - lse
    if not with_entropy:
        return logp
    with torch.no_grad():  # entropy = logsumexp - E_p[logit]; a diagnostic, never differentiated
        ent = lse - (logits.softmax(-1) * logits).sum(-1)
    return logp, ent


def chunked_logprobs(lm_head, hidden, targets, chunk_size: int, with_entropy: bool = False):
    """hidden [R, T, H], targets [R, T] -> logp [R, T] (, entropy [R, T]). Each chunk's lm_head +
    log-softmax runs under activation checkpointing when grad is on, so backward keeps only `hidden`
    and recomputes one chunk's [R, chunk, V] logits at a time."""
    use_ckpt = torch.is_grad_enabled()
    pieces = []
    for s in range(0, hidden.shape[1], chunk_size):
        h, y = hidden[:, s:s + chunk_size], targets[:, s:s + chunk_size]
        if use_ckpt:
            pieces.append(checkpoint(_chunk_logprobs, lm_head, h, y, with_entropy, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(lm_head, h, y, with_entropy))
    if not with_entropy:
        return torch.cat(pieces, dim=1)
    return torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1)


def sequence_logprobs(model, batch: Batch, chunk_size: int = 64, with_entropy: bool = False,
                      share_prompts: bool = True, share_prefix: bool = True):
    """log p(completion token t | prefix) as [R, T] (padding columns: finite junk; mask them); share_prompts,
    share_prefix: see completion_hidden_states."""
    hidden = completion_hidden_states(model, batch, share_prompts, share_prefix)
    targets = batch.input_ids[:, batch.prompt_width:]
    return chunked_logprobs(model.get_output_embeddings(), hidden, targets, chunk_size, with_entropy)
