"""The bf16 fixes (issue 31): a float32 head computed a vocabulary block at a time, and truncated importance
sampling (train.tis_cap) for the gap between the sampler's and the trainer's log-probs."""
import pytest
import torch

import fst
import rollout
from plumbing import guards, models


def test_float32_head_gives_float32_logits_and_the_gradient_of_the_upcast_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 70, bias=False).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    wrapped = models.Float32Head(head, block=32)  # 70 rows: blocks of 32, 32 and 6
    logits = wrapped(h)
    h32 = h.detach().float().requires_grad_()
    reference = h32 @ head.weight.float().T
    assert logits.dtype == torch.float32 and logits.shape == (3, 5, 70)
    assert torch.allclose(logits, reference, rtol=1e-6, atol=1e-6)
    assert not torch.equal(logits, head(h.detach()).float())  # a bf16 head rounds its logits
    grad = torch.randn(3, 5, 70)
    logits.backward(grad)
    reference.backward(grad)
    assert h.grad.dtype == torch.bfloat16 and head.weight.grad is None
    assert torch.allclose(h.grad.float(), h32.grad, rtol=1e-2, atol=1e-2)


def test_float32_logits_multiply_bf16_operands_into_float32_where_the_build_can(monkeypatch):
    """Where torch.mm takes out_dtype=float32 with bf16 operands (CUDA builds), the head multiplies its bf16
    weight as it is (no float32 copy of it) and returns the upcast's logits; the CPU build has no such
    kernel and keeps the blockwise upcast. The CPU check of the first path stands in for CUDA's mm with a
    float32 reference, since bf16 products are exact in float32."""
    assert not models.float32_out_mm(torch.device("cpu"), torch.bfloat16)
    assert models.float32_out_mm(torch.device("meta"), torch.bfloat16)  # the kernel's shape rule exists
    meta = models.float32_logits(torch.empty(2, 3, 16, dtype=torch.bfloat16, device="meta"),
                                 torch.empty(70, 16, dtype=torch.bfloat16, device="meta"), None, 32)
    assert meta.shape == (2, 3, 70) and meta.dtype == torch.float32
    torch.manual_seed(0)
    h, weight, bias = (torch.randn(*s, dtype=torch.bfloat16) for s in ((2, 3, 16), (70, 16), (70,)))
    upcast = models.float32_logits(h, weight, bias, 32)
    operands, real_mm = [], torch.mm

    def cuda_like_mm(a, b, out_dtype=None):
        operands.append((a.dtype, b.dtype, out_dtype))
        return real_mm(a.float(), b.float())

    monkeypatch.setattr(models, "float32_out_mm", lambda device, dtype: True)
    monkeypatch.setattr(torch, "mm", cuda_like_mm)
    fused = models.float32_logits(h, weight, bias, 32)
    assert operands == [(torch.bfloat16, torch.bfloat16, torch.float32)]
    assert fused.dtype == torch.float32 and fused.shape == (2, 3, 70)
    torch.testing.assert_close(fused, upcast, atol=1e-5, rtol=1e-5)


def test_fp32_head_is_installed_after_lora_and_keeps_the_tie(tiny_model_dir):
    model, _ = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="bfloat16", lora_r=4, lora_alpha=8,
                                                    fp32_head=True), torch.device("cpu"))
    head = model.get_output_embeddings()
    assert isinstance(head, models.Float32Head)
    assert head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied as before
    assert not any("lora" in n for n, _ in head.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model(input_ids=ids).logits.dtype == torch.float32
    plain, _ = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="float32", fp32_head=True),
                                 torch.device("cpu"))
    assert not isinstance(plain.get_output_embeddings(), models.Float32Head)  # float32: nothing to fix


def test_fp32_head_keeps_the_heads_key_and_its_tie(tiny_model_dir):
    """The head stays a Linear under `lm_head.weight`: save_pretrained, tie_weights and merges see the plain
    model (a wrapper submodule renamed the key to lm_head.head.weight, which none of them know)."""
    model, _ = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="bfloat16", lora_r=4, lora_alpha=8,
                                                    fp32_head=True), torch.device("cpu"))
    base = model.get_base_model()
    assert "lm_head.weight" in base.state_dict() and not any(".head." in k for k in base.state_dict())
    base.tie_weights()
    head = base.get_output_embeddings()
    assert isinstance(head, models.Float32Head) and head.weight is base.get_input_embeddings().weight


def test_fp32_head_trains_a_lora_on_the_head(tiny_model_dir):
    """lora_targets naming lm_head with model.fp32_head: the logits are the float32 head plus the LoRA's
    update, and the LoRA gets its gradient (it was bypassed: no update in the logits, no gradient)."""
    model, _ = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="bfloat16", lora_r=4, lora_alpha=8,
                                                    lora_targets="lm_head", fp32_head=True), torch.device("cpu"))
    lora = {n[n.index("lora_"):]: p for n, p in model.named_parameters() if "lm_head." in n and "lora_" in n}
    a, b = lora["lora_A.default.weight"], lora["lora_B.default.weight"]
    torch.nn.init.normal_(b, std=0.5)  # a trained LoRA: B != 0
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1].detach().float()                                                 # [1, 5, H]
    weight = model.get_input_embeddings().weight.float()  # the tied head
    want = h @ weight.T + (h @ a.T @ b.T) * (8 / 4)  # lora_alpha / lora_r
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, want.detach(), atol=1e-4, rtol=1e-4)
    out.logits.logsumexp(-1).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_truncated_is_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    fresh = torch.tensor([True, False])
    old, weight = fst.truncated_is(logp, sampler, fresh, cap=1.2)
    # fresh row: ratio against the trainer's own log-probs, weight min(exp(logp - sampler), cap)
    assert torch.equal(old[0], logp.detach()[0]) and torch.equal(old[1], sampler[1])
    assert torch.allclose(weight, torch.tensor([[1.2, torch.exp(torch.tensor(-1.0)).item()], [1.0, 1.0]]))


def test_tis_cispo_gradient_is_the_weighted_policy_gradient():
    """cispo with TIS on fresh rows: d/dlogp of the loss = -w * A * token weight (the ratio is 1)."""
    logp = torch.tensor([[-1.0, -2.0, -0.7]], requires_grad=True)
    sampler = torch.tensor([[-1.2, -1.0, -0.7]])
    mask = torch.ones(1, 3)
    tc = fst.TrainConfig(loss="cispo", kl_coef=0.0, tis_cap=2.0)
    old, w = fst.truncated_is(logp, sampler, torch.tensor([True]), tc.tis_cap)
    weights = fst.token_weights("cispo", mask, torch.tensor([0]), 8)
    fst.policy_loss(tc, logp, old, torch.tensor([0.5]), mask, weights * w).backward()
    expected = -torch.clamp(torch.exp(logp.detach() - sampler), max=2.0) * 0.5 * weights
    assert torch.allclose(logp.grad, expected)


def test_tis_weights_the_policy_term_and_not_the_kl_term():
    """grpo with TIS and a KL penalty, by hand: d/dlogp = (w * d(policy term) + kl_coef * d(k3)) * token
    weight, with w = min(pi / pi_sampler, cap) on the policy term alone (verl, TRL)."""
    logp = torch.tensor([[-1.0, -2.0, -0.7]], requires_grad=True)
    sampler = torch.tensor([[-1.2, -1.0, -0.7]])
    base = torch.tensor([[-0.9, -2.5, -1.0]])
    mask, adv, kl_coef = torch.ones(1, 3), 0.5, 0.3
    tc = fst.TrainConfig(loss="grpo", kl_coef=kl_coef, tis_cap=2.0)
    old, w = fst.truncated_is(logp, sampler, torch.tensor([True]), tc.tis_cap)
    weights = fst.token_weights("grpo", mask, torch.tensor([0]), 8)
    fst.policy_loss(tc, logp, old, torch.tensor([adv]), mask, weights, base_logp=base, tis_weight=w).backward()
    ratio_one = -adv  # d/dlogp of -rho * A at rho = 1 (old = logp): inside the clip
    d_k3 = 1 - torch.exp(base - logp.detach())  # d/dlogp of exp(b - l) - (b - l) - 1
    expected = (w * ratio_one + kl_coef * d_k3) * weights
    assert torch.allclose(logp.grad, expected)
    assert not torch.allclose(logp.grad, w * (ratio_one + kl_coef * d_k3) * weights)  # the KL term unweighted


@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_update_logs_the_truncated_weight(tiny_model_dir, tokenizer, cap):
    model, tok = models.load_model(models.ModelConfig(name=tiny_model_dir, dtype="float32", lora_r=4, lora_alpha=8),
                                   torch.device("cpu"))
    prompts = [rollout.encode_chat(tok, [{"role": "user", "content": "Hi"}])]
    ro = rollout.sample(model, tok, prompts, [4], max_new_tokens=4, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    ro.logprobs = [[lp - 0.3 * (i % 2) for i, lp in enumerate(row)] for row in ro.logprobs]  # a gap
    exp = fst.experience_from([{"id": 0}], [0] * 4, [0] * 4, ro, [(1.0, ""), (0.0, ""), (1.0, ""), (0.0, "")],
                              scale_by_std=True, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    tc = fst.TrainConfig(lr=0.01, warmup_steps=0, tis_cap=cap)
    optimizer, scheduler = fst.make_optimizer(model, tc)
    base_logp = fst.base_logprobs(model, exp.batch, 16, 64)
    stats = fst.update(model, optimizer, scheduler, exp, base_logp, tc, 4, guards.UpdateGuard(), 0)
    if cap == 0:
        assert stats.tis_weight is None and stats.tis_capped is None
    else:  # every other token's sampler log-prob is 0.3 lower: weight exp(0.3) = 1.35 there, ~1 elsewhere
        assert 1.1 < stats.tis_weight < 1.25 and stats.tis_capped == 0.0
