"""Seeds: every random stream of a run is a function of (seed, step, purpose), and the global RNGs' state.

A resumed run replays the uninterrupted one exactly because of this. Changing a row of SEEDS changes
every run's numbers.
"""
from __future__ import annotations

import random

import numpy as np
import torch

SEEDS = {  # purpose -> (seed, step, index) -> the integer that stream is seeded with
    "init": lambda seed, step, i: seed,                                    # LoRA's initial A matrices
    "stream": lambda seed, step, i: seed + i,                              # stage i's data order
    "step": lambda seed, step, i: seed * 1_000_003 + step,                 # global RNGs and the sampler
    "contexts": lambda seed, step, i: seed * 1_000_003 + step * 1000 + i,  # which pool prompts problem i gets
    "fast": lambda seed, step, i: seed * 1_000_003 + step + 7,             # fast round: sampling, reflection
    "fast_choices": lambda seed, step, i: seed * 1_000_003 + step,         # fast round: parents, minibatches
    "validation": lambda seed, step, i: seed + 12345,                      # the same draws at every validation
    "rank": lambda seed, step, i: seed + i * 1_000_000_007,                # torchrun: rank i's version of a seed
}


def seed_for(purpose: str, seed: int, step: int = 0, index: int = 0) -> int:
    """The seed of one random stream: `purpose` is a key of SEEDS, `seed` the run's train.seed."""
    return SEEDS[purpose](seed, step, index)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's and NumPy's global RNG state as JSON-able lists (torch's is a tensor: saved apart)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    return {"python": [python[0], list(python[1]), python[2]],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}


def set_rng_state(state: dict):
    """Python's, NumPy's and torch's global RNGs: rng_state() plus "torch" (torch.get_rng_state())."""
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(state["torch"])
