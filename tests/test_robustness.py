"""No silent failures: runs killed with SIGKILL resume exactly, damaged checkpoints are skipped, and
the update guards (gradient flow on the first update, non-finite updates) stop or skip loudly."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import fst
from conftest import ROOT, run_with_parity_rewards
from plumbing import checkpoints, guards, models, runlog



def is_timing(key: str) -> bool:
    """Fields that depend on wall-clock time, not on the computation (seconds_*, tokens_per_s)."""
    return key.startswith("seconds") or key == "tokens_per_s"


def run_args(tmp_path, name, model_dir, steps=6):
    """A small fst-mode run that exercises every phase: updates, fast rounds after steps 2 and 5,
    validation every 3 steps, checkpoints every 2."""
    sets = {"model.name": model_dir, "out_dir": tmp_path, "run_name": name, "train.steps": steps,
            "train.save_every": 2, "sampling.max_new_tokens": 8, "train.batch_size": 2,
            "sampling.group_size": 4, "train.lr": 0.01, "mode": "fst", "fast.every": 3, "fast.budget": 2,
            "fast.reflector_max_new_tokens": 8, "fast.operators": "[demo, reflect]", "eval.every": 3,
            "eval.n": 2, "eval.k": 2}
    return ["--config", "tiny.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The reference: the same run, never interrupted, in a fresh process on one thread like the killed
    runs' first part (kill_driver.py): nothing an earlier test left in this process can change it."""
    tmp = tmp_path_factory.mktemp("reference")
    run_fresh(run_args(tmp, "full", tiny_model_dir))
    return tmp / "full"


def run_fresh(args: list[str]) -> None:
    """fst.main(args) with parity rewards in a fresh one-thread process, as kill_driver.py runs the killed
    runs: runs compared number for number must not depend on what earlier tests left in this process."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import conftest; "
            "conftest.run_with_parity_rewards(sys.argv[2:])")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), *args], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def assert_same_run(run_dir, reference):
    assert without_timing(read_jsonl(run_dir / "metrics.jsonl")) == without_timing(read_jsonl(reference / "metrics.jsonl"))
    assert read_jsonl(run_dir / "samples.jsonl") == read_jsonl(reference / "samples.jsonl")
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("where, n", [("update", 4), ("fast", 2), ("checkpoint", 2)])
def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, uninterrupted,
                                                           parity_rewards, where, n):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_driver.py"), where, str(n),
                           *run_args(tmp_path, "killed", tiny_model_dir)],
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    run_dir = tmp_path / "killed"
    done = read_jsonl(run_dir / "metrics.jsonl")
    assert len(done) < len(read_jsonl(uninterrupted / "metrics.jsonl"))  # it really stopped early
    if where == "checkpoint":  # the second save (step 3) was cut: its half-written folder is left
        assert (run_dir / "checkpoints" / "step_000003.tmp").is_dir()
        assert checkpoints.latest_checkpoint(run_dir).name == "step_000001"
    if where == "update":  # and a kill in the middle of a log line leaves half a line
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"kind": "train", "step": 3, "rew')
    run_fresh(["--resume", str(run_dir)])
    assert_same_run(run_dir, uninterrupted)


def test_damaged_checkpoints_are_skipped_and_the_previous_one_used(tmp_path, uninterrupted, parity_rewards,
                                                                   capsys):
    run_dir = tmp_path / "damaged"
    shutil.copytree(uninterrupted, run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000003", "step_000005"]
    state = ckpts / "step_000005" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])                      # truncated
    (ckpts / "step_000003" / "adapter_model.safetensors").unlink()   # missing adapter
    assert checkpoints.latest_checkpoint(run_dir).name == "step_000001"
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "step_000005" in err and "adapter_model.safetensors is missing" in err
    run_fresh(["--resume", str(run_dir)])
    assert_same_run(run_dir, uninterrupted)


def test_truncate_jsonl_keeps_eval_rows_written_before_the_checkpoint(tmp_path):
    """An eval row's step counts updates done: eval step 4 is written after train step 3, before the
    checkpoint of step 3, so resuming at step 4 keeps it and drops train step 4 and eval step 5."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 3}, {"kind": "eval", "step": 4},
            {"kind": "train", "step": 4}, {"kind": "eval", "step": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    runlog.truncate_jsonl(path, 4)
    assert read_jsonl(path) == rows[:3]


# ------------------------------------------------------------------------------ update guards

def short_run(tmp_path, model_dir, name, steps):
    return fst.main(run_args(tmp_path, name, model_dir, steps) + ["--set", "mode=rl", "--set", "eval.every=0"])


def test_ctrl_c_inside_interrupt_held_lands_after_the_block():
    """The step's log line and its completion mark are written together: Ctrl-C between them waits."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with guards.interrupt_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("row")       # still runs: the interrupt is held
            done.append("mark")
    assert done == ["row", "mark"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Ctrl-C acts at once again
    with guards.interrupt_held():
        pass                          # no Ctrl-C: nothing raised


def test_gradient_flow_guard_names_a_frozen_layer(tmp_path, tiny_model_dir, parity_rewards, monkeypatch):
    real_load = models.load_model

    def load_with_a_detached_layer(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        q = model.base_model.model.model.layers[1].self_attn.q_proj
        q.lora_B["default"].register_forward_hook(lambda module, inputs, output: output.detach())
        return model, tok
    monkeypatch.setattr(models, "load_model", load_with_a_detached_layer)
    with pytest.raises(SystemExit) as e:
        short_run(tmp_path, tiny_model_dir, "frozen", 3)
    message = str(e.value)
    assert message.startswith("training error: gradient-flow check failed on the first update")
    assert "layers.1.self_attn.q_proj.lora_B.default.weight: no gradient" in message
    assert "layers.0." not in message  # the healthy layers are not blamed
    assert not (tmp_path / "frozen" / "checkpoints").exists()  # no update was taken, nothing saved


def test_a_non_finite_update_is_skipped_and_logged(tmp_path, tiny_model_dir, parity_rewards, monkeypatch):
    real_loss, calls = fst.policy_loss, []

    def nan_on_first_call(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss
    monkeypatch.setattr(fst, "policy_loss", nan_on_first_call)
    short_run(tmp_path, tiny_model_dir, "one-nan", 4)
    rows = read_jsonl(tmp_path / "one-nan" / "metrics.jsonl")
    updated = [r for r in rows if r["dropped_group_frac"] < 1]
    assert updated[0]["update_skipped"] == "non-finite loss"
    assert all(r["update_skipped"] is None for r in updated[1:]) and len(updated) >= 2
    assert rows[-1]["kl_to_base"] > 0  # later updates went through


def test_three_non_finite_updates_in_a_row_stop_the_run(tmp_path, tiny_model_dir, parity_rewards, monkeypatch):
    monkeypatch.setattr(fst, "policy_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as e:
        short_run(tmp_path, tiny_model_dir, "all-nan", 8)
    assert str(e.value).startswith("training error: non-finite loss at steps [")
    rows = read_jsonl(tmp_path / "all-nan" / "metrics.jsonl")
    assert sum(r["update_skipped"] == "non-finite loss" for r in rows) == 2  # the third raised before its log line
    assert all(r["kl_to_base"] < 1e-6 for r in rows)  # no update ever reached the weights


def test_no_bitsandbytes_kernel_warning_without_4bit(tiny_model_dir):
    """bitsandbytes warns about 'kernels-community' on import on AVX512-BF16 CPUs (peft imports it);
    a run that does not use 4-bit must not show it. (On other CPUs it is never printed at all.)"""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import fst; from plumbing import models; "
            "models.load_model(models.ModelConfig(name=sys.argv[2], dtype='float32'), torch.device('cpu'))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), tiny_model_dir], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr
