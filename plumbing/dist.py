"""torchrun: `Dist`, the few collectives the loop needs, joining the process group, and fingerprints.

Every rank runs the same loop on its share of each batch's problems (a group never spans ranks). LoRA
gradients are summed by an explicit all-reduce, not DDP (sampling runs the model outside any wrapper);
other work is split and gathered, so every rank takes the same decisions.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as collective

from plumbing import guards, seeds


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (rank 0 of 1 in a plain process) and the collectives."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives run: cuda:LOCAL_RANK under NCCL (it takes GPU tensors only)

    @property
    def is_main(self) -> bool:  # rank 0 writes files and draws progress bars
        return self.rank == 0

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (the value itself in one process); integers are summed as float32, float64 stays."""
        if self.world == 1:
            return value
        out = value.detach().to(self.device, copy=True)
        out = out if out.is_floating_point() else out.float()
        collective.all_reduce(out)
        return out.to(value.device)

    def generator(self, device, seed: int) -> torch.Generator:
        """A sampling generator on `device`: `seed` on rank 0, a seed derived from it on every other rank."""
        return torch.Generator(device=device).manual_seed(seeds.seed_for("rank", seed, index=self.rank))

    def check_same(self, what: str, fingerprint) -> None:
        """Stop if ranks disagree (the pool and the adapter must be identical everywhere after a step).
        `fingerprint()` makes the rank's hash; in one process it is not computed (hashing is not free)."""
        if self.world == 1:
            return
        seen = self.gather([fingerprint()])
        if len(set(seen)) > 1:
            differ = [r for r, f in enumerate(seen) if f != seen[0]]
            raise guards.TrainingError(f"ranks diverged: {what} on rank(s) {differ} differs from rank 0's")

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (picklable; the object itself in one process)."""
        if self.world == 1:
            return obj
        box = [obj]
        collective.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of `items`: sizes differ by at most one, rank order = item order."""
        n, r = divmod(len(items), self.world)
        start = self.rank * n + min(self.rank, r)
        return items[start:start + n + (self.rank < r)]

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
        if self.world == 1:
            return list(items)
        parts = [None] * self.world
        collective.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def map(self, fn, items: list) -> list:
        """fn over a list of independent items, split over ranks; every rank gets all results in order."""
        mine = self.shard(items)
        return self.gather(fn(mine) if mine else [])

    def split_round(self, evaluate, reflect):
        """A fast round's evaluate(prompt_texts, problems) and reflect(prompts), split over ranks by item."""
        if self.world == 1:
            return evaluate, reflect

        def split_evaluate(texts, problems):
            return self.map(lambda pairs: evaluate([t for t, _ in pairs], [p for _, p in pairs]),
                            list(zip(texts, problems)))
        return split_evaluate, functools.partial(self.map, reflect)

    def say_resumed(self, ckpt: Path, step: int, saved_world: int) -> None:
        """Rank 0 says where the run resumes, and whether a change of world size keeps it from replaying."""
        if not self.is_main:
            return
        print(f"[fst] resumed from {ckpt} at step {step}", file=sys.stderr)
        if saved_world != self.world:  # it works, but it is not the run it would have been
            print(f"[fst] note: saved by {saved_world} process(es), resumed by {self.world}: the batches go "
                  "on where they stopped, but each rank's sampling seed differs, so the run will not replay "
                  "what the saved world size would have done", file=sys.stderr)

    def close(self, finished: bool = True):
        """Leave the process group. After a normal finish the ranks meet at a barrier first (a rank tearing its
        gloo connections down while its peer uses one aborts the peer); after an error the peer may never come."""
        if self.world > 1 and collective.is_initialized():
            if finished:
                collective.barrier()
            collective.destroy_process_group()

    def sum_gradients(self, params):
        """Sum every parameter's gradient over ranks, in one flat buffer (one collective call)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        collective.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.device)
            offset += g.numel()


def fingerprint(model=None, pool=None) -> str:
    """A short hash of the trainable weights or of the prompt pool, for Dist.check_same."""
    h = hashlib.sha256()
    if model is not None:
        for name, p in model.named_parameters():
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
    if pool is not None:
        h.update(json.dumps(pool.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def init_distributed() -> Dist:
    """Dist() in a plain process; under torchrun joins the process group: NCCL, a GPU per rank, or gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not collective.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        collective.init_process_group("nccl" if cuda else "gloo")
    if collective.get_rank() != 0:  # rank 0 alone speaks: no second copy of transformers' loading bars
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    return Dist(rank=collective.get_rank(), world=collective.get_world_size(),
                device=f"cuda:{local_rank}" if collective.get_backend() == "nccl" else "cpu")
