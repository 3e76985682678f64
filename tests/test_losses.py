"""fst.py's RL losses. Every registered loss (fst.LOSSES, and the loss README.md's "Adding a loss"
registers) goes through the checks any policy-gradient loss must pass; the built-in ones also against
hand computations; and the README's loss trains one real step on a tiny model."""
import math

import pytest
import torch

import fst
from conftest import ROOT, readme_example_registered

pytestmark = pytest.mark.usefixtures("one_thread")

README_LOSS = "gspo"  # what README.md's loss example registers


@pytest.fixture(params=sorted(set(fst.LOSSES) | {README_LOSS}))
def loss(request):
    """Each registered loss by name; the README's example registered for the test only."""
    if request.param in fst.LOSSES:
        yield request.param
        return
    with readme_example_registered("loss", fst.LOSSES) as name:
        assert name == README_LOSS
        yield name


def settings(kind, **kw):
    """The TrainConfig a loss reads its settings from; no KL term unless asked."""
    return fst.TrainConfig(loss=kind, **({"kl_coef": 0.0} | kw))


def random_batch(seed=0, rows=6, tokens=5):
    """(mask [R, T] with rows of different lengths, group [R]: 3 groups of 2, log-probs [R, T] near a
    sampler's old ones (ratios inside every clip), advantages [R])."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=gen)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    old = -torch.rand(rows, tokens, generator=gen) * 3
    logp = old + 0.05 * torch.randn(rows, tokens, generator=gen)
    return mask, torch.arange(rows) // 2, logp, old, torch.randn(rows, generator=gen)


# ---------------------------------------------------------------- every registered loss
def test_on_policy_the_gradient_is_the_advantage_weighted_policy_gradient(loss):
    """With old = current (detached) every ratio is 1, and d loss / d logp = -weight x advantage: the
    REINFORCE gradient under the loss's normaliser, whatever its clip or sequence-level ratio."""
    mask, group, logp, _, adv = random_batch()
    logp.requires_grad_(True)
    w = fst.token_weights(loss, mask, group, 5)
    value = fst.policy_loss(settings(loss), logp, logp.detach(), adv, mask, w)
    value.backward()
    assert torch.isfinite(value)
    assert torch.allclose(logp.grad, -w * adv[:, None], atol=1e-6)


def test_zero_advantage_gives_zero_loss_and_gradient_off_policy(loss):
    mask, group, logp, old, _ = random_batch(1)
    logp.requires_grad_(True)
    w = fst.token_weights(loss, mask, group, 5)
    value = fst.policy_loss(settings(loss), logp, old, torch.zeros(len(group)), mask, w)
    value.backward()
    assert value.item() == 0.0 and torch.all(logp.grad == 0)


def test_padding_carries_nothing(loss):
    """What sits at masked-out positions (padding after a short completion) changes neither the loss
    nor the gradient."""
    mask, group, logp, old, adv = random_batch(2)
    assert (mask == 0).any()
    w = fst.token_weights(loss, mask, group, 5)
    results = []
    for fill in (0.0, 5.0):
        lp = torch.where(mask > 0, logp, torch.full_like(logp, -fill)).requires_grad_(True)
        old_lp = torch.where(mask > 0, old, torch.full_like(old, fill))
        value = fst.policy_loss(settings(loss), lp, old_lp, adv, mask, w)
        value.backward()
        results.append((value.item(), lp.grad * mask))
    assert math.isfinite(results[0][0]) and results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1])


def test_weights_average_over_the_mask_and_follow_their_rows(loss):
    """The normaliser's weights are >= 0, zero off the mask, sum to at most 1 (an average, not a sum)
    and move with their rows when the batch is reordered."""
    mask, group, *_ = random_batch(3)
    w = fst.token_weights(loss, mask, group, 5)
    assert torch.all(w >= 0) and torch.all(w[mask == 0] == 0)
    assert 0 < w.sum().item() <= 1 + 1e-6
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    assert torch.allclose(fst.token_weights(loss, mask[order], group[order], 5), w[order])


def test_micro_batches_add_up_to_the_full_batch_loss(loss):
    torch.manual_seed(0)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    logp, old, adv = -torch.rand(6, 5), -torch.rand(6, 5), torch.randn(6)
    w = fst.token_weights(loss, mask, group, 5)
    full = fst.policy_loss(settings(loss), logp, old, adv, mask, w)
    parts = sum(fst.policy_loss(settings(loss), logp[s:s + 4], old[s:s + 4], adv[s:s + 4], mask[s:s + 4], w[s:s + 4])
                for s in (0, 4))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_a_ranks_weights_are_the_one_process_weights(loss):
    """Under torchrun each rank holds whole groups and its normaliser sums its counts over ranks
    (batch_total = Dist.total). Played here by hand: each rank's counts, then each rank given the
    other's, must give the rows the weights one process gives them."""
    mask, group, *_ = random_batch(4)
    full = fst.token_weights(loss, mask, group, 5)
    ranks = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5])]  # whole groups
    counts = []
    for rows in ranks:
        seen = []
        fst.token_weights(loss, mask[rows], group[rows], 5, batch_total=lambda c: seen.append(c) or c)
        counts.append(seen)
    for r, rows in enumerate(ranks):
        other = iter(counts[1 - r])
        mine = fst.token_weights(loss, mask[rows], group[rows], 5, batch_total=lambda c: c + next(other))
        assert torch.allclose(mine, full[rows])


def test_kl_penalty_gradient_matches_hand_computation(loss):
    """With zero advantages only the k3 KL term is left, the same for every loss."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    base = torch.tensor([[-1.5, -1.0]])
    w = fst.token_weights(loss, torch.ones(1, 2), torch.tensor([0]), 2)
    value = fst.policy_loss(settings(loss, kl_coef=0.1), logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), w,
                            base_logp=base)
    value.backward()
    # k3 = exp(b - l) - (b - l) - 1;  d/dl = 1 - exp(b - l)
    pairs = [(-1.0, -1.5), (-2.0, -1.0)]
    for t, (l, b) in enumerate(pairs):
        assert logp.grad[0, t].item() == pytest.approx(0.1 * w[0, t].item() * (1 - math.exp(b - l)), rel=1e-5)
    assert value.item() == pytest.approx(
        0.1 * sum(w[0, t].item() * (math.exp(b - l) - (b - l) - 1) for t, (l, b) in enumerate(pairs)), rel=1e-5)


def test_a_group_of_equal_rewards_contributes_nothing(loss):
    """Adding a group whose rollouts all scored the same leaves the update unchanged."""
    adv, keep = fst.group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), scale_by_std=fst.LOSSES[loss].scale_by_std)
    logp = torch.tensor([[-1.0], [-2.0], [-0.5], [-0.7]], requires_grad=True)
    group, mask = torch.tensor([0, 0, 1, 1]), torch.ones(4, 1)
    rows = keep[group].nonzero().view(-1)
    w = fst.token_weights(loss, mask[rows], group[rows], 1)
    fst.policy_loss(settings(loss), logp[rows], logp[rows].detach(), adv.view(-1)[rows], mask[rows], w).backward()
    assert logp.grad[2:].abs().sum() == 0 and logp.grad[:2].abs().sum() > 0


# ---------------------------------------------------------------- the built-in losses by hand
# A hand-sized batch: 3 rollouts (group 0: rows 0, 1; group 1: row 2), up to 2 tokens each.
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
GROUP = torch.tensor([0, 0, 1])
ADV = torch.tensor([1.0, -1.0, 2.0])
LOGP = [[-1.0, -2.0], [-0.5, -3.0], [-1.5, -0.2]]
# log ratios: row 0 token 1 has rho = e^2 (> 1 + eps, < tau); row 2 token 0 has rho = e^1.5 = 4.48 > tau.
OLD = [[-1.0, -4.0], [-0.5, -3.0], [-3.0, -0.2]]
BUILT_IN = ["cispo", "grpo", "dr_grpo", "dapo"]


def _weights_by_hand(kind):
    if kind == "cispo":  # group 0 has 3 tokens, group 1 has 2; 2 groups
        return [[1 / 3 / 2, 1 / 3 / 2], [1 / 3 / 2, 0], [1 / 2 / 2, 1 / 2 / 2]]
    if kind == "grpo":
        return [[1 / 2 / 3, 1 / 2 / 3], [1 / 1 / 3, 0], [1 / 2 / 3, 1 / 2 / 3]]
    if kind == "dr_grpo":  # max_new_tokens = 4
        return [[1 / 4 / 3] * 2, [1 / 4 / 3, 0], [1 / 4 / 3] * 2]
    return [[1 / 5, 1 / 5], [1 / 5, 0], [1 / 5, 1 / 5]]  # dapo: 5 tokens


def _token_loss_and_grad(kind, lp, old, a):
    """One token by hand: (loss, d loss / d logp)."""
    rho = math.exp(lp - old)
    if kind == "cispo":
        w = min(rho, 4.0)
        return -w * a * lp, -w * a
    high = 0.28 if kind == "dapo" else 0.2
    clipped = min(max(rho, 0.8), 1 + high)
    unclipped_val, clipped_val = rho * a, clipped * a
    if unclipped_val <= clipped_val:  # min picks the unclipped term: gradient flows
        return -unclipped_val, -rho * a
    return -clipped_val, 0.0


@pytest.mark.parametrize("kind", BUILT_IN)
def test_loss_value_and_gradient_match_hand_computation(kind):
    weights = fst.token_weights(kind, MASK, GROUP, max_new_tokens=4)
    assert weights.tolist() == [pytest.approx(r) for r in _weights_by_hand(kind)]
    logp = torch.tensor(LOGP, requires_grad=True)
    value = fst.policy_loss(settings(kind), logp, torch.tensor(OLD), ADV, MASK, weights)
    value.backward()
    want_loss, want_grad = 0.0, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    hand_w = _weights_by_hand(kind)
    for r in range(3):
        for t in range(2):
            token_value, grad = _token_loss_and_grad(kind, LOGP[r][t], OLD[r][t], ADV[r].item())
            want_loss += hand_w[r][t] * token_value
            want_grad[r][t] = hand_w[r][t] * grad
    assert value.item() == pytest.approx(want_loss, rel=1e-5)
    assert logp.grad.tolist() == [pytest.approx(g, rel=1e-5, abs=1e-7) for g in want_grad]


def test_the_readme_loss_clips_one_ratio_per_sequence():
    """The README's GSPO on the hand batch: a sequence's ratio is exp(mean token log-ratio). Row 0
    (log-ratios 0, 2: ratio e > 1.2, A = 1) and row 2 (1.5, 0: ratio e^0.75 > 1.2, A = 2) are clipped
    as wholes, so none of their tokens gets a gradient, although row 0's first token alone has ratio 1;
    row 1 (ratio 1, A = -1) passes. Loss = mean over rows: (-1.2 + 1 - 2.4) / 3."""
    with readme_example_registered("loss", fst.LOSSES) as name:
        weights = fst.token_weights(name, MASK, GROUP, max_new_tokens=4)
        logp = torch.tensor(LOGP, requires_grad=True)
        value = fst.policy_loss(settings(name), logp, torch.tensor(OLD), ADV, MASK, weights)
        value.backward()
    assert value.item() == pytest.approx((-1.2 + 1.0 - 2.4) / 3, rel=1e-5)
    assert logp.grad.tolist() == [pytest.approx(g, abs=1e-7) for g in [[0.0, 0.0], [1 / 3, 0.0], [0.0, 0.0]]]
    assert name not in fst.LOSSES  # unregistered again: no other test sees it


# ---------------------------------------------------------------- the README's loss, one real step
def test_the_readme_loss_trains_one_real_step(tmp_path, tiny_model_dir, parity_rewards):
    """README.md's loss picked by train.loss, one step through fst's phase functions on a tiny model:
    its per-token loss is what update() calls, the loss is finite and every LoRA B moved."""
    with readme_example_registered("loss", fst.LOSSES) as name:
        registered, calls = fst.LOSSES[name], []

        def watched(logp, old_logp, adv, mask, tc):
            per_token = registered.per_token(logp, old_logp, adv, mask, tc)
            calls.append(per_token.shape == logp.shape)
            return per_token

        fst.LOSSES[name] = registered._replace(per_token=watched)
        cfg = fst.load_config(str(ROOT / "configs" / "tiny.yaml"), [
            f"model.name={tiny_model_dir}", "mode=rl", "eval.every=0", f"train.loss={name}", "train.batch_size=2",
            "sampling.group_size=4", "sampling.max_new_tokens=8", "train.lr=0.01"])
        run = fst.start_run(cfg, tmp_path / name)
        task, stream = run.stage(0)
        before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        exp = fst.make_experience(cfg, run, task, stream.next_batch(), 0)
        base_logp = fst.base_logprobs(run.model, exp.batch, cfg.train.micro_batch, cfg.train.logprob_chunk)
        upd = fst.update(run.model, run.optimizer, run.scheduler, exp, base_logp, cfg.train,
                         cfg.sampling.max_new_tokens, run.guard, 0)
    assert calls and all(calls)
    assert upd.skipped is None and upd.rows > 0 and math.isfinite(upd.loss)
    after = dict(run.model.named_parameters())
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b and all(not torch.equal(before[n], after[n].detach()) for n in lora_b)
