"""eval.py: exact chunked KL against a full-logits reference, mean@k / accuracy / pass@k against hand counts,
the 2x2 table on a stub, plots from synthetic run folders, and the CLI end to end on a tiny model."""
import dataclasses
import json

import pytest
import torch
import yaml

import eval as ev
import fst
import rewards
import rollout
from plumbing import checkpoints, dist, models, runlog
from pool import PromptPool


class StubTask:
    """Deterministic scorer: 1 for "yes" in the text, 0.5 for "maybe", else 0."""
    name = "stub"
    default_system_prompt = "Answer yes or no."

    def __init__(self, n=3, scorer=None):
        self.problems = [{"id": f"p{i}", "question": f"Is {i} even? " * (i + 1), "answer": "yes"}
                         for i in range(n)]
        self.scorer = scorer

    def load(self, split):
        return [dict(p) for p in self.problems]

    def messages(self, problem, system_prompt):
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem["question"]}]

    def score(self, problem, text):
        if self.scorer:
            return self.scorer(text), "stub"
        return (1.0 if "yes" in text else 0.5 if "maybe" in text else 0.0), "stub"


def with_lora(model, randomise=False, seed=0):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if randomise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def random_batch(vocab, seed=0):
    """Prompts of different lengths (left padding) and completions of different lengths (right padding)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]
    comps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 2, 11)]
    return rollout.collate(prompts, comps, pad_id=0, device="cpu")


def reference_kl(model, batch):
    """Full logits, no chunking: the straightforward computation the chunked one must equal."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    P, T = batch.prompt_width, batch.completion_mask.shape[1]
    with torch.no_grad():
        lp = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=pos).logits[:, P - 1:P - 1 + T].float().log_softmax(-1)
        with model.disable_adapter():
            lq = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=pos).logits[:, P - 1:P - 1 + T].float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1) * batch.completion_mask


# ---------------------------------------------------------------------------------- KL
def test_kl_of_fresh_lora_is_zero(tiny_model, tokenizer):
    model = with_lora(tiny_model)  # LoRA B = 0: adapter on == adapter off
    kl = ev.exact_token_kl(model, random_batch(len(tokenizer)), chunk_size=4)
    assert kl.shape == (3, 11)
    assert kl.abs().max().item() < 1e-6


def test_kl_with_trained_lora_is_positive_and_matches_full_logits(tiny_model, tokenizer):
    model = with_lora(tiny_model, randomise=True)
    batch = random_batch(len(tokenizer))
    ref = reference_kl(model, batch)
    mask = batch.completion_mask.bool()
    assert ref[mask].min().item() > 0 and ref[mask].mean().item() > 1e-2
    for chunk in (1, 5, 64):
        kl = ev.exact_token_kl(model, batch, chunk_size=chunk)
        assert kl.shape == ref.shape
        assert kl[mask].min().item() >= 0
        assert (kl[~mask] == 0).all()  # padding contributes nothing
        torch.testing.assert_close(kl, ref, atol=1e-5, rtol=1e-4)


def test_kl_to_base_samples_and_averages_over_tokens(tiny_model, tokenizer):
    task = StubTask()
    kw = dict(n_samples=2, max_new_tokens=6, temperature=1.0, chunk_size=3)
    fresh = with_lora(tiny_model)
    zero = ev.kl_to_base(fresh, tokenizer, task, task.problems, "Hi.", generator=torch.Generator().manual_seed(0), **kw)
    assert abs(zero) < 1e-6
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    # The same average by hand: sample with the same seed, then the token-weighted mean of exact KL.
    ro = rollout.sample(fresh, tokenizer, [rollout.encode_chat(tokenizer, task.messages(p, "Hi."))
                                           for p in task.problems], [2] * 3, max_new_tokens=6,
                        temperature=1.0, generator=torch.Generator().manual_seed(1))
    batch = rollout.collate(ro.prompt_ids, ro.completion_ids, tokenizer.pad_token_id, "cpu")
    by_hand = (reference_kl(fresh, batch).sum() / batch.completion_mask.sum()).item()
    kl = ev.kl_to_base(fresh, tokenizer, task, task.problems, "Hi.", generator=torch.Generator().manual_seed(1),
                       micro_batch=4, **kw)  # micro-batches of 4 rows must not change the token average
    assert kl > 1e-2
    assert kl == pytest.approx(by_hand, rel=1e-4)


# ---------------------------------------------------------------------------------- accuracy
def test_two_by_two_on_a_stub():
    table = {("base", "seed"): 0.1, ("base", "evolved"): 0.3, ("trained", "seed"): 0.4,
             ("trained", "evolved"): 0.7}
    calls = []
    out = ev.two_by_two(lambda w, p: calls.append((w, p)) or table[w, p])
    assert sorted(calls) == sorted(table)
    assert out["base"] == {"seed": 0.1, "evolved": 0.3}
    assert out["trained"] == {"seed": 0.4, "evolved": 0.7}
    assert out["slow_gain"] == pytest.approx(0.3)
    assert out["fast_gain"] == pytest.approx(0.2)
    assert out["both_gain"] == pytest.approx(0.6)


def test_evaluate_counts_mean_and_pass_at_k(monkeypatch, tiny_model, tokenizer):
    texts = ["yes", "no", "maybe", "no", "yes!", "yes"]  # problem 0: pass; 1: partial only; 2: pass
    calls = []

    def fake_sample(model, tok, prompts, counts, **kw):
        calls.append((prompts, counts, kw))
        return rollout.Rollouts(prompt_index=[0, 0, 1, 1, 2, 2], texts=texts)
    monkeypatch.setattr(ev.rollout, "sample", fake_sample)
    task = StubTask()
    out = ev.evaluate(tiny_model, tokenizer, task, task.problems, "Sys.", k=2, max_new_tokens=5,
                      temperature=0.5)
    assert len(calls) == 1 and calls[0][1] == [2, 2, 2] and len(calls[0][0]) == 3
    assert calls[0][2]["temperature"] == 0.5 and calls[0][2]["max_new_tokens"] == 5
    assert out["mean_at_k"] == pytest.approx(3.5 / 6)
    assert out["accuracy"] == pytest.approx(3 / 6)  # the "maybe" (0.5) is partial credit, not a success
    assert out["pass_at_k"] == pytest.approx(2 / 3)
    assert out["n"] == 3


def test_evaluate_on_a_model_and_adapter_switch(monkeypatch, tiny_model_dir, tiny_model, tokenizer):
    seen = []
    real_sample = rollout.sample

    def spy(*a, **kw):
        seen.append(real_sample(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(ev.rollout, "sample", spy)
    task = StubTask(n=4, scorer=lambda text: (len(text) % 3) / 2)  # rewards 0, 0.5, 1 by text length
    kw = dict(k=3, max_new_tokens=5, temperature=1.0)
    model = with_lora(tiny_model, randomise=True)
    model.train()
    out = ev.evaluate(model, tokenizer, task, task.problems, "Sys.", generator=torch.Generator().manual_seed(0), **kw)
    assert model.training  # left as found
    ro = seen[-1]
    assert len(ro.texts) == 12 and ro.prompt_index == [i for i in range(4) for _ in range(3)]
    reward = [(len(t) % 3) / 2 for t in ro.texts]
    assert out["mean_at_k"] == pytest.approx(sum(reward) / 12)
    assert out["pass_at_k"] == pytest.approx(sum(any(r >= 1 for r in reward[3 * i:3 * i + 3]) for i in range(4)) / 4)

    # use_adapter=False samples from the base weights: same texts as a plain copy of the base model.
    ev.evaluate(model, tokenizer, task, task.problems, "Sys.", generator=torch.Generator().manual_seed(0),
                use_adapter=False, **kw)
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ev.evaluate(base.eval(), tokenizer, task, task.problems, "Sys.", generator=torch.Generator().manual_seed(0), **kw)
    assert seen[1].completion_ids == seen[2].completion_ids
    assert seen[0].completion_ids != seen[1].completion_ids  # the adapter really changes the policy


# ---------------------------------------------------------------------------------- plots
def write_run(root, name, train, evals=(), fast=(), pool=None, kind_field=True):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    rows = [({"kind": "train"} if kind_field else {}) | r for r in train]
    rows += [{"kind": "eval"} | r for r in evals] + [{"kind": "fast"} | r for r in fast]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')  # cut line
    if pool is not None:
        ckpt = run / "checkpoints" / "step_000029"
        ckpt.mkdir()
        (ckpt / "pool.json").write_text(json.dumps(pool))
        (run / "checkpoints" / "latest").write_text(ckpt.name)
    return run


def train_rows(n, task=lambda s: "arithmetic", fast_every=0):
    return [{"step": s, "task": task(s), "reward_mean": s / n, "accuracy": s / n, "kl_to_base": 0.001 * s,
             "rollouts_rl": 32 * (s + 1), "rollouts_fast": 40 * (s // fast_every) if fast_every else 0}
            for s in range(n)]


def eval_rows(steps, acc, prompt="seed", task="arithmetic", fast_per_step=0):
    return [{"step": s, "task": task, "prompt": prompt, "mean_at_k": a, "pass_at_k": min(1, 2 * a),
             "rollouts_rl": 32 * (s + 1), "rollouts_fast": fast_per_step * s} for s, a in zip(steps, acc)]


def test_compare_writes_plots_and_steps_to_reach(tmp_path, capsys):
    steps = [0, 10, 20, 29]
    rl = write_run(tmp_path, "rl", train_rows(30), eval_rows(steps, [0.1, 0.2, 0.4, 0.3]), kind_field=False)
    pool = {"next_id": 4, "prompts": [
        {"id": 0, "text": "seed", "parent_id": None, "born_step": 0, "operator": "seed",
         "scores": {"a": 0.0, "b": 1.0}, "in_top_k": True},
        {"id": 2, "text": "child", "parent_id": 0, "born_step": 6, "operator": "reflect",
         "scores": {"a": 1.0, "b": 1.0}, "in_top_k": True},
        {"id": 3, "text": "grandchild", "parent_id": 2, "born_step": 12, "operator": "demo",
         "scores": {"a": 1.0, "b": 0.0}, "in_top_k": False},
        {"id": 5, "text": "orphan", "parent_id": 4, "born_step": 18, "operator": "reflect",
         "scores": {}, "in_top_k": False}]}  # parent 4 was pruned from the pool
    fstrun = write_run(tmp_path, "fst", train_rows(30, fast_every=6),
                       eval_rows(steps, [0.1, 0.45, 0.5, 0.55], "best", fast_per_step=7)
                       + eval_rows(steps, [0.1, 0.3, 0.35, 0.4], "seed"),
                       fast=[{"step": s, "accepted": 1} for s in (5, 11, 17)], pool=pool)
    continual = write_run(tmp_path, "continual", train_rows(30, task=lambda s: ["arithmetic", "countdown"][s >= 15]),
                          eval_rows([0, 10], [0.1, 0.2]) + eval_rows([20, 29], [0.05, 0.1], task="countdown"))
    noeval = write_run(tmp_path, "noeval", train_rows(30))
    out = tmp_path / "plots"
    ev.main(["compare", str(rl), str(fstrun), str(continual), str(noeval), "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ("val_accuracy.png", "kl_vs_reward.png", "lineage_fst.png", "continual_continual.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not (out / "continual_rl.png").exists() and not (out / "lineage_rl.png").exists()
    assert "noeval: no eval rows, plotting training reward instead" in printed
    assert "target: rl's best validation mean@k = 0.400" in printed
    lines = printed.splitlines()
    assert "  rl: step 20" in lines
    assert "  fst: step 10" in lines  # the "best" prompt curve is the deployed policy's
    assert "  continual: never" in lines
    assert "  noeval: no eval rows" in lines


def test_compare_without_eval_rows_in_first_run(tmp_path):
    run = write_run(tmp_path, "a", train_rows(5))
    notes = ev.compare([run], tmp_path / "plots")
    assert any("steps-to-reach skipped" in n for n in notes)
    assert (tmp_path / "plots" / "val_accuracy.png").stat().st_size > 0


# ---------------------------------------------------------------------------------- CLI end to end
def test_cli_report_on_a_tiny_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = fst.load_config(None, [f"model.name={tiny_model_dir}", "model.dtype=float32", "device=cpu",
                                 "model.lora_r=4", "task.name=arithmetic", "sampling.max_new_tokens=4",
                                 "eval.n=2", "eval.k=2", "mode=fst"])
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000003"
    model, _ = models.load_model(cfg.model, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    optimizer, scheduler = fst.make_optimizer(model, cfg.train)
    checkpoints.save_checkpoint(run, 3, model, optimizer, scheduler, PromptPool("Evolved: answer fast."),
                                {"streams": [], "totals": {}, "demo_buffer": [], "world": 1, "kept_rollouts": []})
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 0, "task": "arithmetic"}) + "\n")

    def offline(name, config, split, required=()):
        raise ConnectionError("no hub here")
    monkeypatch.setattr(rewards, "load_hub_dataset", offline)
    ev.main([str(run), "--forgetting", "countdown", "gsm8k"])
    printed, said = capsys.readouterr()
    out = json.loads((run / "eval" / "step_3.json").read_text())
    assert out["step"] == 3 and out["n"] == 2 and out["k"] == 2 and out["evolved_prompt"] == "Evolved: answer fast."
    t = out["tasks"]["arithmetic"]
    for table in (t["two_by_two_mean_at_k"], t["two_by_two_accuracy"], t["two_by_two_pass_at_k"]):
        assert all(0 <= table[w][p] <= 1 for w in ("base", "trained") for p in ("seed", "evolved"))
    assert t["accuracy"]["mean_at_k"] == t["two_by_two_mean_at_k"]["trained"]["evolved"]
    assert t["accuracy"]["accuracy"] == t["two_by_two_accuracy"]["trained"]["evolved"]
    assert t["kl_to_base"]["seed_prompt"] > 0 and t["kl_to_base"]["evolved_prompt"] > 0
    assert set(out["forgetting"]["countdown"]) == {"base", "trained", "delta_mean_at_k"}
    assert "no hub here" in out["forgetting"]["gsm8k"]["skipped"]
    assert "| trained |" in printed and "countdown" in printed and "skipped" in printed
    assert "[eval] forgetting on gsm8k skipped: no hub here" in said


def test_summary_says_which_prompt_did_better_on_each_task_at_the_end(tmp_path):
    train = [{"step": s, "mode": "fst", "seconds_step": 1.0, "kl_to_base": 0.01} for s in range(4)]
    acc = {("add", "seed"): (0.1, 0.6), ("add", "best"): (0.1, 0.4), ("compare", "seed"): (0.2, 0.3),
           ("compare", "best"): (0.2, 0.5), ("word_count", "seed"): (0.3, 0.3), ("word_count", "best"): (0.3, 0.3)}
    evals = [{"step": step, "task": task, "prompt": prompt, "accuracy": a[step > 0], "n": 8, "k": 2}
             for step in (0, 4) for (task, prompt), a in acc.items()]
    run = write_run(tmp_path, "run", train, evals)
    text = runlog.summarize(run)
    assert json.loads((run / "summary.json").read_text())["better_at_end"] == {
        "add": "seed", "compare": "best", "word_count": "tie"}
    lines = {task: next(line for line in text.splitlines() if f"held-out accuracy on {task} " in line)
             for task in ("add", "compare", "word_count")}
    assert lines["add"].endswith("at the end the seed prompt did better")
    assert lines["compare"].endswith("at the end the best context did better")
    assert lines["word_count"].endswith("at the end: a tie")
    rl = write_run(tmp_path, "rl", train, [e for e in evals if e["prompt"] == "seed"])  # one prompt: no verdict
    assert "did better" not in runlog.summarize(rl) and "tie" not in runlog.summarize(rl)


def test_forgetting_defaults_to_the_named_subset_and_skips_unreachable_data_at_once(monkeypatch, capsys):
    cfg = fst.load_config(None, ["task.name=compare"])
    measured = []
    monkeypatch.setattr(rewards, "hub_reachable", lambda: False)  # the hub is not asked, nor retried
    out = {name: ev.forgetting_on(name, cfg, 2, lambda task, problems, adapter: measured.append(task.name) or
                                  {"mean_at_k": 0.5 if adapter else 0.25}, dist.Dist())
           for name in ev.FORGETTING_TASKS if name != cfg.task.name}
    assert list(out) == ["gsm8k", "arithmetic"] and set(ev.FORGETTING_TASKS) < set(rewards.TASKS)
    assert "unreachable" in out["gsm8k"]["skipped"] and out["arithmetic"]["delta_mean_at_k"] == 0.25
    assert measured == ["arithmetic", "arithmetic"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("[eval] forgetting on gsm8k skipped: ")


def test_the_problem_count_has_a_name_torchrun_does_not_swallow(monkeypatch, tmp_path):
    """torchrun reads `--n` as an abbreviation of its own options; `--problems` reaches eval.py."""
    from torch.distributed.run import get_args_parser
    assert get_args_parser().parse_args(["eval.py", "RUN", "--problems", "7"]).training_script_args[-1] == "7"
    seen = {}
    monkeypatch.setattr(ev, "report", lambda run, **kw: seen.update(kw) or {"json_path": ""})
    monkeypatch.setattr(ev, "markdown", lambda out: "")
    for flag in ("--problems", "--n"):
        ev.main([str(tmp_path), flag, "7"])
        assert seen["n"] == 7


def test_summary_says_at_which_step_the_deployed_prompt_first_left_the_floor(tmp_path):
    train = [{"step": s, "mode": "fst", "seconds_step": 1.0, "kl_to_base": 0.01} for s in range(9)]
    curve = {"seed": (0.05, 0.1, 0.25, 0.3), "best": (0.05, 0.2, 0.1, 0.4)}  # best: 0.2 at step 3, a dip after
    evals = [{"step": 3 * i, "task": "add", "prompt": p, "accuracy": a[i], "n": 8, "k": 2}
             for i in range(4) for p, a in curve.items()]
    text = runlog.summarize(write_run(tmp_path, "fst", train, evals))
    assert f"first at accuracy >= {runlog.FLOOR} (the best context): step 3" in text
    rl = write_run(tmp_path, "rl", train, [dict(e, accuracy=0.1) for e in evals if e["prompt"] == "seed"])
    assert f"first at accuracy >= {runlog.FLOOR} (the seed prompt): never" in runlog.summarize(rl)
