"""Run under torchrun by tests/test_distributed.py (not a test module itself):

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py grads MODEL_DIR OUT_DIR

`grads`: every rank takes its share of whole groups of one fixed batch of rollouts, weights the tokens
with the batch-wide normalisers (Dist.total), backpropagates each loss and sums the LoRA gradients over
ranks (Dist.sum_gradients); rank 0 saves them for the test to compare with the one-process gradients.
"""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

import fst  # noqa: E402
import rollout  # noqa: E402

LOSSES = ["cispo", "grpo", "dr_grpo", "dapo"]


def fixed_batch(vocab: int):
    """8 rollouts in 4 groups of 2, prompts and completions of different lengths, fixed by a seed."""
    gen = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for row in range(8):
        prompt = torch.randint(5, vocab, (3 + row // 2,), generator=gen).tolist()  # shared within a group
        prompts.append(prompt if row % 2 == 0 else prompts[-1])
        completions.append(torch.randint(5, vocab, (2 + (3 * row) % 5,), generator=gen).tolist())
    group = torch.arange(8) // 2
    advantage = torch.randn(8, generator=gen)
    return prompts, completions, group, advantage


def lora_gradients(model_dir: str, loss: str, dist: fst.Dist) -> dict:
    fst.seed_everything(0)
    model, tok = fst.load_model(fst.ModelConfig(name=model_dir, dtype="float32", lora_r=4, lora_alpha=8),
                                torch.device("cpu"))
    with torch.no_grad():  # non-zero B, so A gets a gradient too
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    prompts, completions, group, advantage = fixed_batch(len(tok))
    rows = dist.shard(list(range(0, 8, 2)))  # this rank's groups...
    rows = [r for g in rows for r in (g, g + 1)]  # ...and their rows
    batch = rollout.collate([prompts[r] for r in rows], [completions[r] for r in rows], tok.pad_token_id)
    model.train()
    logp = rollout.sequence_logprobs(model, batch)
    weights = fst.token_weights(loss, batch.completion_mask, group[rows] - group[rows].min(), 6,
                                batch_total=dist.total)
    fst.policy_loss(loss, logp, logp.detach(), advantage[rows], weights).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    dist.sum_gradients(params)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def main():
    command, model_dir, out_dir = sys.argv[1:4]
    dist = fst.init_distributed()
    if command == "grads":
        grads = {loss: lora_gradients(model_dir, loss, dist) for loss in LOSSES}
        if dist.is_main:
            torch.save(grads, Path(out_dir) / f"grads_world{dist.world}.pt")


if __name__ == "__main__":
    main()
