"""fst.py start-up checks: every config value out of its range, and every missing file, unknown task,
unknown task option, or folder that is not a run, stops `fst.main` with one line before a run folder
exists. No model is loaded here: each case fails at start-up or the test fails."""
import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

import fst
from conftest import GSM8K_TEST, ROOT
from plumbing import config


def start(tmp_path, *sets, config="tiny.yaml"):
    """fst.main as a user runs it, into tmp_path/runs; returns the SystemExit message."""
    args = ["--config", config, "--set", f"out_dir={tmp_path / 'runs'}"]
    for item in sets:
        args += ["--set", item]
    with pytest.raises(SystemExit) as stop:
        fst.main(args)
    assert not (tmp_path / "runs").exists(), "a run folder was created before the error"
    message = str(stop.value.code)
    assert "\n" not in message and message.strip()
    return message


# --- value ranges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key, allowed", [
    # the three from the issue
    ("sampling.temperature=-1", "sampling.temperature", ">= 0"),
    ("train.steps=-5", "train.steps", ">= 1"),
    ("sampling.group_size=1", "sampling.group_size", ">= 2"),
    # and the rest, at or just past each bound
    ("sampling.top_p=0", "sampling.top_p", "in (0, 1]"),
    ("sampling.top_p=1.5", "sampling.top_p", "in (0, 1]"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens", ">= 1"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.steps=0", "train.steps", ">= 1"),
    ("train.micro_batch=0", "train.micro_batch", ">= 1"),
    ("train.logprob_chunk=0", "train.logprob_chunk", ">= 1"),
    ("train.save_every=0", "train.save_every", ">= 1"),
    ("train.lr=0", "train.lr", "> 0"),
    ("train.lr=-1e-5", "train.lr", "> 0"),
    ("train.lr=.nan", "train.lr", "> 0"),
    ("train.warmup_steps=-1", "train.warmup_steps", ">= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm", ">= 0"),
    ("train.kl_coef=-0.001", "train.kl_coef", ">= 0"),
    ("train.clip_eps=0", "train.clip_eps", "in (0, 1)"),
    ("train.clip_eps=1", "train.clip_eps", "in (0, 1)"),
    ("train.dapo_clip_high=0", "train.dapo_clip_high", "> 0"),
    ("train.cispo_tau=0", "train.cispo_tau", "> 0"),
    ("train.betas=[0.9, 1.0]", "train.betas[1]", "in [0, 1)"),
    ("train.betas=[-0.1, 0.999]", "train.betas[0]", "in [0, 1)"),
    ("train.betas=[0.9]", "train.betas", "two numbers"),
    ("train.log_samples=-1", "train.log_samples", ">= 0"),
    ("model.lora_r=0", "model.lora_r", ">= 1"),
    ("model.lora_alpha=0", "model.lora_alpha", "> 0"),
    ("model.lora_dropout=1", "model.lora_dropout", "in [0, 1)"),
    ("model.lora_dropout=-0.1", "model.lora_dropout", "in [0, 1)"),
    ("fast.every=0", "fast.every", ">= 1"),
    ("fast.pool_size=0", "fast.pool_size", ">= 1"),
    ("fast.minibatch=0", "fast.minibatch", ">= 1"),
    ("fast.budget=0", "fast.budget", "> 0"),
    ("fast.budget=.inf", "fast.budget", "> 0"),
    ("fast.max_prompt_chars=0", "fast.max_prompt_chars", ">= 1"),
    ("fast.reflector_max_new_tokens=0", "fast.reflector_max_new_tokens", ">= 1"),
    ("fast.reflector_temperature=-0.5", "fast.reflector_temperature", ">= 0"),
    ("fast.reflector_top_p=0", "fast.reflector_top_p", "in (0, 1]"),
    ("eval.every=-1", "eval.every", ">= 0"),
    ("eval.n=0", "eval.n", ">= 1"),
    ("eval.k=0", "eval.k", ">= 1"),
    ("schedule=[{name: arithmetic, steps: 3}, {name: countdown, steps: 0}]", "schedule[1].steps", ">= 1"),
])
def test_out_of_range_value_stops_main_naming_key_and_range(tmp_path, override, key, allowed):
    message = start(tmp_path, override)
    assert message.startswith("config error:")
    assert f"'{key}'" in message and allowed in message


@pytest.mark.parametrize("override", [
    "sampling.temperature=0", "sampling.top_p=1", "sampling.group_size=2", "train.clip_eps=0.5",
    "train.warmup_steps=0", "train.max_grad_norm=0", "train.kl_coef=0", "train.betas=[0, 0.5]",
    "train.log_samples=0", "eval.every=0", "model.lora_dropout=0", "train.seed=-3",
])
def test_values_on_the_allowed_side_of_each_bound_load(override):
    fst.load_config("tiny.yaml", [override])


def test_load_config_checks_ranges_for_every_entry_point():
    # eval.py and the tests build configs with load_config alone: the ranges apply there too.
    with pytest.raises(config.ConfigError, match=r"'sampling.top_p' must be in \(0, 1\], got 0"):
        fst.load_config(None, ["sampling.top_p=0"])


def _numeric(hint) -> bool:
    args = typing.get_args(hint)
    return hint in (int, float) or (typing.get_origin(hint) is list and args[0] in (int, float))


def _config_classes(cls=fst.Config):
    yield cls
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        inner = (typing.get_args(hint) or [hint])[0] if typing.get_origin(hint) is list else hint
        if dataclasses.is_dataclass(inner):
            yield from _config_classes(inner)


def test_every_numeric_key_has_a_range_and_every_range_a_key():
    """A new int/float key needs a line in its class's `ranges` ("any" if every value is fine)."""
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        ranges = getattr(cls, "ranges", {})
        missing = [name for name, hint in hints.items() if _numeric(hint) and name not in ranges]
        assert not missing, f"{cls.__name__}: no range for {missing}"
        assert set(ranges) <= set(hints), f"{cls.__name__}.ranges names no field: {set(ranges) - set(hints)}"
        for spec in ranges.values():
            config.in_range(0.5, spec)  # every spec parses


def test_in_range_bounds():
    assert config.in_range(0, ">= 0") and not config.in_range(-1e-9, ">= 0")
    assert not config.in_range(0, "> 0") and config.in_range(1e-9, "> 0")
    assert config.in_range(1, "(0, 1]") and not config.in_range(0, "(0, 1]")
    assert config.in_range(0, "[0, 1)") and not config.in_range(1, "[0, 1)")
    assert not config.in_range(float("nan"), ">= 0") and not config.in_range(float("inf"), "> 0")
    assert config.in_range(float("-inf"), "any")


# --- missing files, unknown tasks, folders that are not runs ----------------------------------------

def test_missing_config_file(tmp_path):
    message = start(tmp_path, config=str(tmp_path / "nope.yaml"))
    assert message.startswith("config error: config file") and "nope.yaml" in message and "not found" in message


def test_config_file_that_is_not_yaml_or_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {steps: 3\n")
    assert "not valid YAML" in start(tmp_path, config=str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "expected a mapping" in start(tmp_path, config=str(tmp_path / "list.yaml"))


def test_unknown_task_lists_the_known_ones(tmp_path):
    message = start(tmp_path, "task.name=gsm9k")
    assert message.startswith("config error:") and "'task.name'" in message and "'gsm9k'" in message
    known = message.split("registered tasks: ")[1].split("\n")[0].split(", ")
    assert {"arithmetic", "countdown", "gsm8k", "add"} <= set(known) and known == sorted(known)
    message = start(tmp_path, "schedule=[{name: arithmetic, steps: 2}, {name: sudoku, steps: 2}]")
    assert "'schedule[1].name'" in message and "'sudoku'" in message


def test_unknown_task_option_names_it_and_the_accepted_ones(tmp_path):
    message = start(tmp_path, "task.options.format_rewrad=0.1")
    assert message.startswith("config error:") and "'task.options.format_rewrad'" in message
    assert "format_reward" in message  # among the options it does take
    # a value the task's constructor refuses is named too
    message = start(tmp_path, "task.name=countdown", "task.options={n_numbers: 1}")
    assert message.startswith("config error:") and "'task.options'" in message and "n_numbers" in message


@pytest.mark.parametrize("sets, key", [
    (["task.name=gsm8k", "task.options={}", "task.train_path=/no/such/train.jsonl"], "task.train_path"),
    (["task.name=gsm8k", "task.options={}", f"task.train_path={GSM8K_TEST}", "task.test_path=missing.jsonl"],
     "task.test_path"),
    (["schedule=[{name: arithmetic, steps: 2}, {name: gsm8k, steps: 2, train_path: /no/such.jsonl}]"],
     "schedule[1].train_path"),
])
def test_missing_data_file(tmp_path, sets, key):
    message = start(tmp_path, *sets)
    assert message.startswith("config error:") and f"'{key}'" in message and "file not found" in message


def test_data_path_on_a_task_that_reads_no_files(tmp_path):
    message = start(tmp_path, f"task.train_path={GSM8K_TEST}")  # tiny.yaml's task (add) is generated
    assert "'task.train_path'" in message and "reads no data files" in message


def test_init_from_a_folder_without_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    message = start(tmp_path, f"init_from={tmp_path / 'empty'}")
    assert message.startswith("init_from:") and "no checkpoint" in message


def test_gpu_recipe_on_a_cpu_machine_stops_before_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="configs/tiny.yaml"):
        fst.main(["--config", "gsm8k.yaml", "--set", f"out_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    def resume(folder):
        with pytest.raises(SystemExit) as stop:
            fst.main(["--resume", str(folder)])
        return str(stop.value.code)

    assert "not a run folder (no config.yaml" in resume(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "not_a_run").mkdir()
    assert "not a run folder (no config.yaml" in resume(tmp_path / "not_a_run")
    run = tmp_path / "never_saved"
    run.mkdir()
    (run / "config.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    message = resume(run)
    assert "no checkpoint saved there" in message and "--config" in message
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing written into it


def test_a_user_sees_one_line_and_no_traceback(tmp_path):
    """As typed at a shell: exit status 1, one line on stderr, no run folder."""
    done = subprocess.run([sys.executable, str(ROOT / "fst.py"), "--config", "tiny.yaml",
                           "--set", "sampling.temperature=-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr == "config error: config key 'sampling.temperature' must be >= 0, got -1.0\n"
    assert list(tmp_path.iterdir()) == []


def test_eval_on_a_folder_that_is_not_a_run_or_with_a_bad_value(tmp_path):
    import eval as ev
    with pytest.raises(SystemExit, match=r"^config error: config file .*config.yaml' not found"):
        ev.main([str(tmp_path)])
    (tmp_path / "config.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    with pytest.raises(SystemExit, match=r"^config error: config key 'eval.k' must be >= 1, got 0$"):
        ev.main([str(tmp_path), "--set", "eval.k=0"])


def test_a_reflector_model_that_cannot_exist_stops_at_start_up(tmp_path):
    message = start(tmp_path, "mode=fst", f"fast.reflector={tmp_path / 'no-such-model'}")
    assert message.startswith("config error: config key 'fast.reflector' must be base, policy or a model")
    assert "no-such-model" in message


def test_an_empty_override_is_the_empty_string():
    assert fst.load_config("tiny.yaml", ["task.system_prompt="]).task.system_prompt == ""
    with pytest.raises(config.ConfigError, match="'train.steps' must be int, got str ''"):
        fst.load_config("tiny.yaml", ["train.steps="])
