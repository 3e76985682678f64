"""Runs `fst.main` and kills its own process with SIGKILL at a chosen point, so a test can check that
a run killed anywhere resumes exactly (tests/test_robustness.py). Not a test module itself.

    python tests/kill_driver.py WHERE N [fst.py arguments...]

WHERE is where the Nth event sends SIGKILL:
    update      the Nth policy_loss call (mid-step: sampled and scored, weights not yet stepped)
    fast        the Nth rollout.sample call made inside a fast round (mid-round)
    checkpoint  the Nth trainer_state.pt write, after writing half of its bytes (mid-save)
Every task scores the parity of the completion's length (conftest.parity_get_task), as in-process
tests do, so the killed run and the uninterrupted one compute the same thing.
"""
import io
import os
import signal
import sys
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

import conftest  # noqa: E402
import fst  # noqa: E402
import rewards  # noqa: E402
import rollout  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    where, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rewards.get_task = conftest.parity_get_task
    calls = 0

    def count(event: bool) -> bool:
        """Count an event; True when this is the Nth (the moment to die)."""
        nonlocal calls
        calls += event
        return event and calls == n

    if where == "update":
        real_loss = fst.policy_loss

        def policy_loss(*a, **k):
            if count(True):
                die()
            return real_loss(*a, **k)
        fst.policy_loss = policy_loss
    elif where == "fast":
        real_sample = rollout.sample

        def sample(*a, **k):
            if count(any(frame.name == "fast_round" for frame in traceback.extract_stack())):
                die()
            return real_sample(*a, **k)
        rollout.sample = sample
    elif where == "checkpoint":
        real_save = torch.save

        def save(obj, path, *a, **k):
            if count(str(path).endswith("trainer_state.pt")):
                buffer = io.BytesIO()
                real_save(obj, buffer, *a, **k)
                Path(path).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                die()
            return real_save(obj, path, *a, **k)
        torch.save = save
    else:
        raise SystemExit(f"unknown kill point {where!r}")
    fst.main(args)
    raise SystemExit(f"the run finished before kill point {where} #{n} was reached")


if __name__ == "__main__":
    main()
