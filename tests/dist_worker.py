"""Run under torchrun by tests/test_distributed.py (not a test module itself):

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py grads+idle MODEL_DIR OUT_DIR
    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py train MODEL_DIR OUT_DIR [diverge] -- FST_ARGS

`grads`: every rank takes its share of whole groups of one fixed batch of rollouts, weights the tokens
with the batch-wide normalisers (Dist.total), backpropagates each loss and sums the LoRA gradients over
ranks (Dist.sum_gradients); rank 0 saves them for the test to compare with the one-process gradients.

`idle`: fst.update on one step's experience where only rank 0 has a group of mixed rewards (rank 1's
groups all have equal rewards: nothing to train); every rank saves its LoRA weights after the step.

`train`: fst.main(FST_ARGS) as `torchrun ... fst.py FST_ARGS` runs it, with every task scoring the
parity of the completion's length (conftest.parity_get_task: a random model has mixed rewards). Each
rank records the fingerprints fst checks after every step (adapter + pool) in
OUT_DIR/fingerprints_rank{r}.jsonl, so the test can compare the ranks itself. `diverge`: rank 1
nudges one LoRA weight after its first update, which fst must notice and stop on.
"""
import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import torch  # noqa: E402

from plumbing import dist as torchrun, guards, models, seeds  # noqa: E402
import fst  # noqa: E402
import rollout  # noqa: E402

LOSSES = sorted(fst.LOSSES)  # every registered loss


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


def lora_gradients(model_dir: str, loss: str, dist: torchrun.Dist) -> dict:
    seeds.seed_everything(0)
    model, tok = models.load_model(models.ModelConfig(name=model_dir, dtype="float32", lora_r=4, lora_alpha=8),
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
    fst.policy_loss(fst.TrainConfig(loss=loss, kl_coef=0.0), logp, logp.detach(), advantage[rows],
                    batch.completion_mask, weights).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    dist.sum_gradients(params)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def idle_rank_update(model_dir: str, out_dir: str, dist: torchrun.Dist) -> None:
    """One update where rank 1 holds only groups of equal rewards: it must join the sums and take the
    same optimiser step without a forward pass (it used to raise on an empty micro-batch)."""
    seeds.seed_everything(0)
    model, tok = models.load_model(models.ModelConfig(name=model_dir, dtype="float32", lora_r=4, lora_alpha=8),
                                   torch.device("cpu"))
    prompts, completions, _, _ = fixed_batch(len(tok))
    rows = [0, 1, 2, 3] if dist.rank == 0 else [4, 5, 6, 7]
    rewards = [1.0, 0.0, 0.0, 1.0] if dist.rank == 0 else [1.0, 1.0, 0.0, 0.0]  # groups of two
    ro = rollout.Rollouts(prompt_index=[0, 0, 1, 1], prompt_ids=[prompts[r] for r in rows],
                          completion_ids=[completions[r] for r in rows],
                          logprobs=[[-1.0] * len(completions[r]) for r in rows],
                          finish_reasons=["length"] * 4, texts=[""] * 4)
    exp = fst.experience_from([{"id": 0}, {"id": 1}], [0, 0, 1, 1], [0] * 4, ro, [(r, "") for r in rewards],
                              scale_by_std=True, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    tc = fst.TrainConfig(lr=0.01, warmup_steps=0)
    optimizer, scheduler = fst.make_optimizer(model, tc)
    base_logp = fst.base_logprobs(model, exp.batch, tc.micro_batch, tc.logprob_chunk)
    stats = fst.update(model, optimizer, scheduler, exp, base_logp, tc, 8, guards.UpdateGuard(), 0, dist)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "rows": stats.rows, "skipped": stats.skipped},
               Path(out_dir) / f"idle_rank{dist.rank}.pt")


def train(out_dir: str, diverge: bool, fst_args: list[str]) -> None:
    import conftest
    import rewards
    rewards.get_task = conftest.parity_get_task
    check_same = torchrun.Dist.check_same

    def recorded(self, what, fingerprint):
        value = fingerprint()
        with open(Path(out_dir) / f"fingerprints_rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"what": what, "fingerprint": value}) + "\n")
        return check_same(self, what, lambda: value)
    torchrun.Dist.check_same = recorded
    if diverge:
        update = fst.update

        def nudged(model, *args, **kwargs):
            stats = update(model, *args, **kwargs)
            if int(os.environ["RANK"]) == 1:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).add_(1e-3)
            return stats
        fst.update = nudged
    fst.main(fst_args)


def main():
    command, model_dir, out_dir = sys.argv[1:4]
    if command == "train":
        rest = sys.argv[4:]
        return train(out_dir, rest[0] == "diverge", rest[rest.index("--") + 1:])
    dist = torchrun.init_distributed()
    if "grads" in command.split("+"):
        grads = {loss: lora_gradients(model_dir, loss, dist) for loss in LOSSES}
        if dist.is_main:
            torch.save(grads, Path(out_dir) / f"grads_world{dist.world}.pt")
    if "idle" in command.split("+"):
        idle_rank_update(model_dir, out_dir, dist)
    dist.close()  # as fst.main does: leave the process group before exit


if __name__ == "__main__":
    main()
