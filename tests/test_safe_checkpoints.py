"""A run folder is data, not code: no reader of a run folder (--resume, init_from, eval.py) unpickles
anything but tensors and plain containers; a trainer state that does not load safely is refused with
one line naming the file; a checkpoint saved by an older fst (one pickle) is refused with one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import fst
from conftest import ROOT, run_with_parity_rewards
from plumbing import checkpoints

MARKER_NAME = "unpickled-code-ran"


def run_args(out_dir: Path, name: str, model_dir: str, steps: int = 3) -> list[str]:
    sets = {"model.name": model_dir, "out_dir": out_dir, "run_name": name, "train.steps": steps,
            "train.save_every": 1, "sampling.max_new_tokens": 8, "train.batch_size": 2,
            "sampling.group_size": 4, "train.lr": 0.01, "mode": "fst", "fast.every": 2, "fast.budget": 1,
            "fast.operators": "[demo]", "eval.every": 0, "eval.n": 2, "eval.k": 2}
    return ["--config", "tiny.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A real 3-step fst run of the tiny model, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("safe")
    run_with_parity_rewards(run_args(out, "real", tiny_model_dir))
    return out / "real"


class Booby:
    """Unpickling this runs a command: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def booby_trapped_copy(run: Path, dest: Path, old_format: bool) -> Path:
    """A copy of `run` whose every trainer_state.pt would run a command when unpickled; old_format also
    drops trainer_state.json, as a checkpoint written before this format has none."""
    shutil.copytree(run, dest)
    for ckpt in checkpoints.checkpoint_folders(dest):
        torch.save({"step": 2, "optimizer": Booby(dest.parent / MARKER_NAME)}, ckpt / "trainer_state.pt")
        if old_format:
            (ckpt / "trainer_state.json").unlink()
    return dest


def one_line_exit(cmd: list[str]) -> str:
    """Run a command line as a user would; it must fail with exactly one line on stderr and no traceback."""
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_nothing_in_the_project_unpickles_arbitrary_objects():
    unsafe = "weights_only=" + "False"
    found = [f"{path.relative_to(ROOT)}:{n}" for path in ROOT.rglob("*.py") if ".git" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if unsafe in line.replace(" ", "")]
    assert found == []


@pytest.mark.parametrize("old_format", [False, True], ids=["format-2", "format-1"])
def test_a_booby_trapped_run_folder_runs_no_code(tmp_path, tiny_run, tiny_model_dir, old_format):
    trapped = booby_trapped_copy(tiny_run, tmp_path / "trapped", old_format)
    marker = tmp_path / MARKER_NAME
    said = {
        "eval": one_line_exit(["eval.py", str(trapped)]),
        "resume": one_line_exit(["fst.py", "--resume", str(trapped)]),
        "init_from": one_line_exit(["fst.py", *run_args(tmp_path, "probe", tiny_model_dir),
                                    "--set", f"init_from={trapped}"]),
    }
    assert not marker.exists()
    for reader, line in said.items():
        if old_format:  # refused as an old checkpoint, with what to do
            assert "older fst" in line and "start the run afresh" in line, (reader, line)
        else:  # the pickle holds something that is not plain data: no usable checkpoint
            assert "trainer_state.pt" in line and "not plain data" in line and "posix.system" in line, (reader, line)
    assert not (tmp_path / "probe").exists()  # init_from was refused before a run folder was made


@pytest.mark.parametrize("damage, said", [
    (lambda s: s.pop("step"), "missing key 'step'"),
    (lambda s: s.update(streams="positions"), "key 'streams' must be list, got str"),
    (lambda s: s.pop("kept_rollouts"), "missing key 'kept_rollouts'"),  # an older fst's state
])
def test_a_malformed_trainer_state_is_refused_with_one_line_naming_the_file(tmp_path, tiny_run, tiny_model_dir,
                                                                             capsys, damage, said):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    for ckpt in checkpoints.checkpoint_folders(broken):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        damage(state)
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    readers = {"eval": lambda: ev.main([str(broken)]),
               "eval export": lambda: ev.main(["export", str(broken), "--out", str(tmp_path / "export")]),
               "resume": lambda: fst.main(["--resume", str(broken)]),
               "init_from": lambda: fst.main(run_args(tmp_path, "probe", tiny_model_dir)
                                             + ["--set", f"init_from={broken}"])}
    for reader, read in readers.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            read()
        message = str(e.value)
        assert "\n" not in message and "trainer_state.json" in message and said in message, (reader, message)
        assert capsys.readouterr().err == ""  # nothing else printed: the one line is the exit message


def test_an_old_checkpoint_is_refused_with_one_line_and_the_run_folder_left_alone(tmp_path, tiny_run):
    """A trainer state as fst saved it before this format (one pickle, no trainer_state.json): even made of
    plain data, it is refused, and --resume changes nothing in the folder."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    for ckpt in checkpoints.checkpoint_folders(old):
        state = checkpoints.load_trainer_state(ckpt)
        torch.save({k: v for k, v in state.items() if k != "format"}, ckpt / "trainer_state.pt")
        (ckpt / "trainer_state.json").unlink()
    metrics = (old / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        fst.main(["--resume", str(old)])
    assert "older fst" in str(e.value) and "\n" not in str(e.value)
    assert (old / "metrics.jsonl").read_text() == metrics
