"""A run folder is data, not code: no reader of a run folder (--resume, init_from, eval.py) unpickles
anything but tensors and plain containers; a trainer state that does not load safely is refused with
one line naming the file; states written before this format are refused unless trusted, and even then
read without code."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as ev
import fst
import infra
from conftest import ROOT, run_with_parity_rewards

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
    for ckpt in infra.checkpoint_folders(dest):
        torch.save({"step": 2, "optimizer": Booby(dest.parent / MARKER_NAME)}, ckpt / "trainer_state.pt")
        if old_format:
            (ckpt / "trainer_state.json").unlink()
    return dest


def one_line_exit(cmd: list[str]) -> str:
    """Run a command line as a user would; it must fail with exactly one line on stderr and no traceback
    (besides --trust-old-checkpoint's own warning)."""
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()
             and not line.startswith("[fst] warning: --trust-old-checkpoint")]
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
            assert "before run folders became data" in line and "--trust-old-checkpoint" in line, (reader, line)
        else:  # the pickle holds something that is not plain data: no usable checkpoint
            assert "trainer_state.pt" in line and "not plain data" in line and "posix.system" in line, (reader, line)
    # Trusting an old folder reads it without code all the same: the foreign object is refused.
    line = one_line_exit(["fst.py", "--resume", str(trapped), "--trust-old-checkpoint"])
    assert not marker.exists() and ("not plain data" in line if old_format else "trainer_state.pt" in line)
    assert not (tmp_path / "probe").exists()  # init_from was refused before a run folder was made


@pytest.mark.parametrize("damage, said", [
    (lambda s: s.pop("step"), "missing key 'step'"),
    (lambda s: s.update(streams="positions"), "key 'streams' must be list, got str"),
])
def test_a_malformed_trainer_state_is_refused_with_one_line_naming_the_file(tmp_path, tiny_run, tiny_model_dir,
                                                                             capsys, damage, said):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    for ckpt in infra.checkpoint_folders(broken):
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


def old_format_state(ckpt: Path) -> dict:
    """The trainer state as fst wrote it before this format: one pickle, NumPy's RNG state as an array."""
    state = infra.load_trainer_state(ckpt)
    python, numpy_rng = state["rng"]["python"], state["rng"]["numpy"]
    rng = {"python": (python[0], tuple(python[1]), python[2]),
           "numpy": (numpy_rng[0], np.asarray(numpy_rng[1], dtype=np.uint32), *numpy_rng[2:]),
           "torch": state["rng"]["torch"]}
    return {k: v for k, v in state.items() if k != "format"} | {"rng": rng, "prompts": ["(unused)"]}


def test_an_old_checkpoint_is_refused_then_resumed_exactly_when_trusted(tmp_path, tiny_run, parity_rewards,
                                                                         monkeypatch):
    monkeypatch.setattr(infra, "_trust_old_checkpoints", False)  # the flag is process-wide: restored after
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    first, *later = sorted(infra.checkpoint_folders(old))
    for ckpt in later:
        shutil.rmtree(ckpt)
    torch.save(old_format_state(first), first / "trainer_state.pt")
    (first / "trainer_state.json").unlink()
    with pytest.raises(SystemExit) as e:
        fst.main(["--resume", str(old)])
    assert "before run folders became data" in str(e.value) and "\n" not in str(e.value)
    fst.main(["--resume", str(old), "--trust-old-checkpoint"])
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")  # noqa: E731
                         and k != "tokens_per_s"} for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(old) == rows(tiny_run)  # the trusted old state replays the uninterrupted run
