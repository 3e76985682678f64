"""fst.py: config checking, group advantages (the losses: test_losses.py), context mixing, GPU-recipe
guard, QLoRA on CPU, and a short end-to-end run that resumes exactly."""
import json
import random
import subprocess
import sys

import pytest
import torch

import fst
from conftest import ROOT
from plumbing import checkpoints, config, dist, guards, models, seeds, startup


# --- config -------------------------------------------------------------------------------------

def test_config_defaults_and_overrides():
    cfg = fst.load_config("tiny.yaml", ["train.steps=7", "sampling.temperature=1", "mode=fst", "train.lr=2e-4"])
    assert cfg.train.steps == 7 and cfg.mode == "fst"
    assert isinstance(cfg.sampling.temperature, float)  # ints widen to floats
    assert cfg.train.lr == 2e-4  # YAML 1.1 reads '2e-4' as a string; a float key takes it as the number
    assert config.find_config("gsm8k.yaml") == ROOT / "configs" / "gsm8k.yaml"


@pytest.mark.parametrize("override, named", [
    ("train.stpes=3", "train.stpes"),              # unknown key
    ("train.steps=three", "train.steps"),          # wrong type
    ("train.steps=true", "train.steps"),           # a bool is not an int
    ("train.loss=ppo", "train.loss"),              # not one of the choices
    ("sampling.stop=oops", "sampling.stop"),       # not a list
    ("bogus.x=1", "bogus"),                        # unknown section
])
def test_config_errors_name_the_key(override, named):
    with pytest.raises(config.ConfigError, match=f"'{named}'"):
        fst.load_config("tiny.yaml", [override])


@pytest.mark.parametrize("override", ["fast.scoring=batch", "fast.train_on_trials=false", "fast.candidates=1",
                                      "fast.trial_rollouts=2", "fast.demo_buffer=64", "fast.reuse_max_age=2"])
def test_removed_fast_loop_keys_are_refused_as_unknown(override):
    """Batch scoring and the keys no config used are gone: a config that still sets one stops, naming it."""
    key = override.split("=")[0]
    with pytest.raises(config.ConfigError, match=f"unknown config key '{key}'"):
        fst.load_config("tiny.yaml", [override])


def test_every_shipped_config_loads():
    for path in (ROOT / "configs").glob("*.yaml"):
        fst.load_config(str(path))


def test_gpu_recipe_refuses_cpu_and_points_to_tiny(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = fst.load_config("gsm8k.yaml")
    with pytest.raises(SystemExit, match="configs/tiny.yaml"):
        models.pick_device(cfg, "configs/gsm8k.yaml")


@pytest.mark.parametrize("user", [None, "garbage_collection_threshold:0.8", "PYTORCH_ALLOC_CONF"])
def test_main_sets_expandable_segments_first_unless_the_user_chose(monkeypatch, user):
    """Before anything can start CUDA (torchrun's set-up, the model), unless the user set the allocator."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    if user == "PYTORCH_ALLOC_CONF":
        env["PYTORCH_ALLOC_CONF"] = "expandable_segments:False"
    elif user:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user
    monkeypatch.setattr(os, "environ", env)
    seen = []

    def command_line(argv, description):
        seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        raise SystemExit(0)
    monkeypatch.setattr(startup, "command_line", command_line)
    with pytest.raises(SystemExit):
        fst.main([])
    assert seen == [None if user == "PYTORCH_ALLOC_CONF" else user or "expandable_segments:True"]


# --- advantages (the losses: test_losses.py) ---------------------------------------------------

def test_group_advantages_drop_zero_variance_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, keep = fst.group_advantages(rewards)
    assert keep.tolist() == [True, False, True]
    assert torch.all(adv[1] == 0)
    std0 = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert adv[0].tolist() == pytest.approx([0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4)] * 1 + [-0.5 / (std0 + 1e-4), 0.5 / (std0 + 1e-4)])
    adv_dr, _ = fst.group_advantages(rewards, scale_by_std=False)
    assert adv_dr[2].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])


@pytest.mark.parametrize("k, g", [(4, 8), (4, 6), (4, 2), (1, 8), (3, 3)])
def test_assign_contexts_spreads_the_group_over_the_pool(k, g):
    choice = fst.assign_contexts(k, g, random.Random(0))
    assert len(choice) == g
    counts = [choice.count(i) for i in range(k)]
    if g >= k:
        assert min(counts) >= g // k and max(counts) <= g // k + 1
    else:
        assert sorted(counts, reverse=True)[:g] == [1] * g and sum(counts) == g


def test_config_table_is_made_from_the_dataclasses_and_the_config_reference_shows_it():
    table = config.config_table(fst.Config)
    rows = {line.split(" | ")[0].strip("| `"): line for line in table.splitlines()[2:]}
    assert len(rows) == len(table.splitlines()) - 2  # one row per key
    assert "Continual learning" in rows["schedule"] and "Plasticity probe" in rows["init_from"]  # comments above
    assert "steps on this stage" in rows["schedule[i].steps"] and "`100`" in rows["schedule[i].steps"]
    assert r"KL(pi \|\| base)" in rows["train.kl_coef"] and "`1e-5`" in rows["train.lr"]
    reference = (ROOT / "docs" / "config.md").read_text()
    marker = "<!-- config-table: generated by `python fst.py --help-config` -->\n"
    assert reference.count(marker) == 1
    shown = reference.split(marker, 1)[1].split("\n\n", 1)[0].rstrip("\n")
    assert shown == table, "docs/config.md's table differs from the dataclasses: paste `python fst.py --help-config`"


def test_seeds_of_every_purpose():
    """Exact resume depends on these numbers: a change must be deliberate (it changes every run)."""
    assert [seeds.seed_for(p, 3, step=5, index=2) for p in ("init", "stream", "step", "contexts", "fast",
                                                          "fast_choices", "validation")] == \
        [3, 5, 3_000_014, 3_005_011, 3_000_021, 3_000_014, 12348]


# --- model loading, QLoRA on CPU ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_qlora_4bit_trains_after_sampling_on_cpu(tiny_model_dir, dtype):
    """The loop's real order: sample (eval mode, no grad) several times, then train. On AVX512-BF16
    CPUs bitsandbytes would repack each 4-bit weight on the first no-grad eval call into a layout
    whose matmul has no autograd; every LoRA B must still get a gradient afterwards."""
    pytest.importorskip("bitsandbytes")
    import rollout
    cfg = models.ModelConfig(name=tiny_model_dir, dtype=dtype, quant="4bit", lora_r=4, lora_alpha=8)
    model, tok = models.load_model(cfg, torch.device("cpu"))
    linear = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = rollout.encode_chat(tok, [{"role": "user", "content": "2+2?"}])
    for seed in range(3):  # any number of sampling calls
        ro = rollout.sample(model, tok, [ids], [2], max_new_tokens=5, temperature=1.0,
                            generator=torch.Generator().manual_seed(seed))
    model.train()
    batch = rollout.collate(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, torch.device("cpu"))
    logp = rollout.sequence_logprobs(model, batch)
    (-(logp * batch.completion_mask).sum()).backward()
    # lora_B starts at zero, so only lora_B gets a gradient on the first backward.
    b_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    dead = [n for n, g in b_grads.items() if g is None or not g.abs().sum() > 0]
    assert len(b_grads) == 2 * 7 and dead == []  # 2 layers x (q, k, v, o, gate, up, down)
    assert guards.lora_gradient_problems(model) == []


# --- end to end: a few steps on a tiny random model, then resume == uninterrupted ---------------

def _run(tmp_path, name, model_dir, steps, extra=(), resume=False):
    run_dir = tmp_path / name
    if resume:
        args = ["--resume", str(run_dir), "--set", f"train.steps={steps}"]
    else:
        args = ["--config", "tiny.yaml", "--set", f"model.name={model_dir}", "--set", f"out_dir={tmp_path}",
                "--set", f"run_name={name}", "--set", f"train.steps={steps}", "--set", "train.save_every=2",
                "--set", "sampling.max_new_tokens=8", "--set", "train.batch_size=2", "--set", "sampling.group_size=4",
                "--set", "train.lr=0.01", "--set", "mode=rl", "--set", "eval.every=0", *extra]
    fst.main(args)
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Fields that depend on wall-clock time, not on the computation.
TIMING = {"seconds_sampling", "seconds_base_kl", "seconds_training", "seconds_fast", "seconds_step",
          "tokens_per_s", "seconds", "seconds_reflecting", "seconds_scoring", "seconds_proposing"}




def test_every_rollout_samples_with_the_configs_stop_strings(tmp_path, tiny_model_dir, parity_rewards, monkeypatch):
    """RL rollouts, the fast round's scoring rollouts and validation all sample with sampling.stop (the
    reflector alone stops at its own closing fence): a prompt is scored, and a checkpoint validated,
    under the policy RL trains."""
    import rollout
    real_sample, stops = rollout.sample, []

    def spy(*args, **kwargs):
        stops.append(tuple(kwargs.get("stop", ())))
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(rollout, "sample", spy)
    _run(tmp_path, "stop", tiny_model_dir, 3, extra=["--set", "mode=fst", "--set", "fast.every=1",
                                                     "--set", "fast.budget=2", "--set", "fast.operators=[reflect]",
                                                     "--set", "fast.reflector_max_new_tokens=8",
                                                     "--set", "sampling.stop=['zq']",
                                                     "--set", "eval.every=3", "--set", "eval.n=2", "--set", "eval.k=2"])
    # every call is a sampler call with the stop, or the reflector (tiny.yaml: a one-paragraph reply)
    assert set(stops) == {("zq",), ("```", "\n\n")}
    # RL (3 steps), validation (2 points; seed and best are one call while the best is the seed's text),
    # and at least the live pool's scoring in each round.
    assert stops.count(("zq",)) >= 3 + 2 + 3


def test_one_process_never_fingerprints_the_adapter(tmp_path, tiny_model_dir, parity_rewards, monkeypatch):
    """The ranks' drift check hashes every trainable weight after each step; in one process there are no
    ranks to compare, so it must cost nothing there."""
    calls = []
    monkeypatch.setattr(dist, "fingerprint", lambda *a, **k: calls.append(1) or "x")
    _run(tmp_path, "one-process", tiny_model_dir, 2, extra=["--set", "mode=fst", "--set", "fast.every=1",
                                                            "--set", "fast.budget=1", "--set", "fast.operators=[demo]"])
    assert calls == []


@pytest.mark.parametrize("mode", ["rl", "fst", "fst-reuse"])
def test_end_to_end_resume_equals_uninterrupted(tmp_path, tiny_model_dir, parity_rewards, mode):
    """fst-reuse: the checkpoint after step 1 lies between a fast round and the step that trains on its
    rollouts, so the resumed run must carry them over to replay the uninterrupted one."""
    reuse = ["--set", "fast.reuse=all"] if mode == "fst-reuse" else []
    no_reuse = [] if reuse else ["--set", "fast.reuse=none"]
    mode = mode.removesuffix("-reuse")
    extra = ["--set", f"mode={mode}", "--set", "fast.every=2", "--set", "fast.budget=2",
             "--set", "fast.reflector_max_new_tokens=8", "--set", "fast.operators=[demo, reflect]",
             "--set", "eval.every=2", "--set", "eval.n=2", "--set", "eval.k=2", *reuse, *no_reuse]
    full = _run(tmp_path, "full", tiny_model_dir, 4, extra)
    train_rows = [m for m in full if m["kind"] == "train"]
    if reuse:  # steps 2 and 3 train on round 1's rollouts (reuse_max_age 1: over two steps)
        assert [m["rollouts_reused"] for m in train_rows[:2]] == [0, 0] and train_rows[-1]["rollouts_reused"] > 0
    else:
        assert all(m["rollouts_reused"] == 0 and m["reused_share"] == 0 for m in train_rows)
    assert [m["step"] for m in train_rows] == [0, 1, 2, 3]
    assert any(m["loss"] != 0 for m in train_rows) and all(m["kl_to_base"] >= 0 for m in train_rows)
    assert train_rows[-1]["kl_to_base"] > 0  # the adapter moved away from the base
    fast_rows = [m for m in full if m["kind"] == "fast"]
    if mode == "fst":
        assert [m["step"] for m in fast_rows] == [1, 3]
        assert train_rows[-1]["rollouts_fast"] == sum(m["metric_calls"] for m in fast_rows) > 0
        assert (tmp_path / "full" / "pool" / "step_000003.json").exists()
    else:
        assert not fast_rows and train_rows[-1]["rollouts_fast"] == 0
    part = _run(tmp_path, "part", tiny_model_dir, 2, extra)
    ckpt = tmp_path / "part" / "checkpoints" / "step_000001"
    for name in ("adapter_model.safetensors", "pool.json", "best_prompt.txt", "trainer_state.pt"):
        assert (ckpt / name).exists()
    resumed = _run(tmp_path, "part", tiny_model_dir, 4, resume=True)
    assert len(part) == len([m for m in full if m["step"] <= 1 or (m["kind"] == "eval" and m["step"] == 2)])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    # validation at 0, 2 (the checkpoint's own weights: kept on resume) and 4, as in one run
    assert [(r["step"], r["prompt"]) for r in resumed if r["kind"] == "eval"] == \
        [(s, p) for s in (0, 2, 4) for p in (["seed", "best"] if mode == "fst" else ["seed"])]
    assert strip(resumed) == strip(full)


def test_one_step_through_the_phase_functions_is_the_loops_step(tmp_path, tiny_model_dir, parity_rewards):
    """The benchmarks time fst's step by calling the loop's phase functions: called by hand, they log
    the loop's numbers and leave the adapter the loop saved."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    logged = _run(tmp_path, "loop", tiny_model_dir, 1)[0]
    cfg = fst.load_config(str(tmp_path / "loop" / "config.yaml"))
    run = fst.start_run(cfg, tmp_path / "by-hand")
    task, stream = run.stage(0)
    seeds.seed_everything(seeds.seed_for("step", cfg.train.seed, 0))
    lr = run.optimizer.param_groups[0]["lr"]
    exp = fst.make_experience(cfg, run, task, stream.next_batch(), 0)
    base_logp = fst.base_logprobs(run.model, exp.batch, cfg.train.micro_batch, cfg.train.logprob_chunk)
    kl = fst.mean_kl(exp, base_logp)
    upd = fst.update(run.model, run.optimizer, run.scheduler, exp, base_logp, cfg.train,
                     cfg.sampling.max_new_tokens, run.guard, 0)
    assert upd.rows > 0 and upd.skipped is None  # the step trained
    row = json.loads(json.dumps(fst.train_row(cfg, 0, task, exp, kl, upd, lr, {"seconds_base_kl": 0.0,
                                                                              "seconds_training": 0.0})))
    assert {k: v for k, v in row.items() if k not in TIMING} == {k: logged[k] for k in row if k not in TIMING}
    saved = load_file(tmp_path / "loop" / "checkpoints" / "step_000000" / "adapter_model.safetensors")
    mine = get_peft_model_state_dict(run.model)
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)


def test_continual_schedule_validation_and_init_from(tmp_path, tiny_model_dir, parity_rewards):
    """A two-stage schedule switches the task at the right step, validation covers both tasks,
    and a plasticity probe (init_from) starts from exactly the trained adapter."""
    import rollout
    schedule = "schedule=[{name: arithmetic, steps: 2}, {name: countdown, steps: 1}]"
    rows = _run(tmp_path, "cont", tiny_model_dir, 3, ["--set", schedule, "--set", "eval.every=2",
                                                       "--set", "eval.n=2", "--set", "eval.k=2",
                                                       "--set", "task.system_prompt=''"])
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [(r["step"], r["task"]) for r in train_rows] == [(0, "arithmetic"), (1, "arithmetic"), (2, "countdown")]
    evals = {(r["step"], r["task"]) for r in rows if r["kind"] == "eval"}
    assert evals == {(s, t) for s in (0, 2, 3) for t in ("arithmetic", "countdown")}

    cfg = fst.load_config(str(tmp_path / "cont" / "config.yaml"))
    trained, tok = models.load_model(cfg.model, torch.device("cpu"), adapter_path=str(checkpoints.find_checkpoint(str(tmp_path / "cont"))))
    probe = _run(tmp_path, "probe", tiny_model_dir, 1, ["--set", f"init_from={tmp_path / 'cont'}",
                                                         "--set", "task.name=countdown", "--set", "task.options={}",
                                                         "--set", "mode=gepa"])
    assert probe[0]["kl_to_base"] > 0  # it starts away from the base: the trained adapter is in
    started, _ = models.load_model(cfg.model, torch.device("cpu"),
                                adapter_path=str(checkpoints.find_checkpoint(str(tmp_path / "probe"))))
    ids = torch.tensor([rollout.encode_chat(tok, [{"role": "user", "content": "hello"}])])
    with torch.no_grad():  # gepa never updates the weights: the probe's adapter is the source checkpoint's
        assert torch.allclose(trained(ids).logits, started(ids).logits, atol=1e-5)


def test_ctrl_c_saves_the_last_completed_step_and_resume_continues(tmp_path, tiny_model_dir):
    import os
    import signal
    import time
    run_dir = tmp_path / "interrupted"
    args = [sys.executable, str(ROOT / "fst.py"), "--config", "tiny.yaml", "--set", f"model.name={tiny_model_dir}",
            "--set", f"out_dir={tmp_path}", "--set", "run_name=interrupted", "--set", "train.steps=1000",
            "--set", "train.save_every=1000", "--set", "sampling.max_new_tokens=4", "--set", "train.batch_size=1",
            "--set", "sampling.group_size=2", "--set", "mode=rl", "--set", "eval.every=0"]
    # SIGINT back to its default in the child: a shell that starts a job in the background (`cmd &`)
    # leaves SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    done = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    ckpt = checkpoints.latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == f"step_{done[-1]:06d}"
    assert b"resume with" in err
    assert b"[fst] summary of" in err                                   # an interrupted run is summarised too
    assert json.loads((run_dir / "summary.json").read_text())["steps_done"] == done[-1] + 1
    fst.main(["--resume", str(run_dir), "--set", f"train.steps={done[-1] + 2}"])
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(done[-1] + 2))


def test_a_reflector_model_is_loaded_once_writes_the_proposals_and_is_never_trained(
        tmp_path, tiny_model_dir, parity_rewards, monkeypatch):
    import context_opt
    loaded, reflectors = [], []
    real_load, real_make = models.load_frozen_model, context_opt.make_reflector

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    def make(model, tok, **kwargs):
        reflectors.append(model)
        return real_make(model, tok, **kwargs)
    monkeypatch.setattr(models, "load_frozen_model", load)
    monkeypatch.setattr(context_opt, "make_reflector", make)
    _run(tmp_path, "critic", tiny_model_dir, 4, extra=["--set", "mode=fst", "--set", "fast.every=2",
                                                       "--set", "fast.budget=2", "--set", "fast.operators=[reflect]",
                                                       "--set", "fast.reflector_max_new_tokens=8",
                                                       "--set", f"fast.reflector={tiny_model_dir}"])
    assert len(loaded) == 1 and len(reflectors) == 2                  # two rounds, one model
    critic = loaded[0][0]
    assert all(model is critic for model in reflectors) and not hasattr(critic, "disable_adapter")
    assert not any(p.requires_grad for p in critic.parameters()) and not critic.training
    fresh, _ = real_load(tiny_model_dir, fst.load_config("tiny.yaml", [f"model.name={tiny_model_dir}"]).model,
                         torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(critic.state_dict().values(), fresh.state_dict().values()))


def test_a_run_shows_its_fast_rounds_and_ends_with_a_summary(tmp_path, tiny_model_dir, parity_rewards, capsys):
    """What a first run shows: a progress line while a fast round runs and one line when it ends, the held-out
    accuracy on the step bar, and a summary (printed and summary.json) at the end."""
    _run(tmp_path, "watch", tiny_model_dir, 4, extra=["--set", "mode=fst", "--set", "fast.every=2",
                                                      "--set", "fast.budget=2", "--set", "fast.operators=[demo]",
                                                      "--set", "eval.every=2", "--set", "eval.n=2", "--set", "eval.k=2"])
    err = capsys.readouterr().err
    rounds = [line for line in err.splitlines() if line.startswith("[fst] fast round @ step ")]
    assert [line.split(":")[0] for line in rounds] == ["[fst] fast round @ step 1", "[fst] fast round @ step 3"]
    assert all(" proposals, " in line and " accepted" in line and "best anchor " in line for line in rounds)
    assert "fast round @ step 1: " in err and "rollouts of budget" in err      # the progress line while it ran
    assert "val_acc=" in err                                                   # the step bar's held-out accuracy
    summary = json.loads((tmp_path / "watch" / "summary.json").read_text())
    assert summary["steps_done"] == 4 and summary["mode"] == "fst" and summary["seconds"]["fast_round_count"] == 2
    cells = summary["held_out_accuracy"]["add"]
    assert set(cells) == {"seed", "best"} and all(c["steps"] == [0, 4] for c in cells.values())
    assert summary["best_context"]["lineage"][0] == "seed" and summary["kl_to_base"] > 0
    assert any(cmd.startswith("python eval.py export") for cmd in summary["next"])
    assert "[fst] summary of" in err and "held-out accuracy on add" in err and "python eval.py" in err
