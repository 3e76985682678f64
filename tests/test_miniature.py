"""experiments/miniature.py: --quick runs the three studies end to end on a tiny random model and
writes summary.json, the README and the plots; a re-invocation resumes an interrupted run and skips
finished ones; the numbers read off the curves (KL at matched accuracy, the seed-spread verdict)."""
import importlib.util
import json
import shutil
import sys

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def mini():
    spec = importlib.util.spec_from_file_location("miniature", ROOT / "experiments" / "miniature.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["miniature"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def segments(run_dir):
    return json.loads((run_dir / "miniature_run.json").read_text())["segments"]


def test_quick_writes_three_studies_and_resumes_an_interrupted_run(mini, tmp_path, monkeypatch):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--quick", "--threads", "1", "--out", str(out), "--runs-dir", str(runs)]
    mini.main(argv)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["quick"] and set(summary["studies"]) == {"1", "2", "3"}
    for study in summary["studies"].values():
        assert study["plots"] and all((out / png).stat().st_size > 1000 for png in study["plots"])
        assert study["wall_seconds"] > 0 and "--quick" in study["command"]
    readme = (out / "README.md").read_text()
    assert all(f"## Study {n}" in readme for n in (1, 2, 3)) and "no difference at this scale" in readme

    s1 = summary["studies"]["1"]
    assert sorted(r["arm"] for r in s1["runs"].values()) == ["fst", "fst", "gepa", "rl", "rl"]
    fst_run = s1["runs"]["s1-fst-seed0"]
    curve = fst_run["curves"]["add"]
    assert [p["step"] for p in curve] == [0, 2, 4]  # validation every 2 of 4 steps, and before training
    assert all(p["kl"] is not None and p["accuracy"] is not None for p in curve)
    assert fst_run["rollouts_fast"] > 0 and curve[-1]["rollouts_all"] > curve[-1]["rollouts_rl"]
    table = fst_run["two_by_two"]["accuracy"]
    assert table["base"]["seed"] == curve[0]["accuracy_seed_prompt"]
    assert table["trained"]["evolved"] == curve[-1]["accuracy"]
    assert set(table["base"]) == {"seed", "evolved"} and "slow_gain" in table
    assert len(s1["findings"]) == 7

    s2 = summary["studies"]["2"]
    assert [stage for stage, _ in s2["stage_ends"]] == ["compare", "word_count"]
    for r in s2["runs"].values():
        assert set(r["at_stage_end"]["compare"]) == {"compare", "word_count"}  # every task validated
    s3 = summary["studies"]["3"]
    assert {r["arm"] for r in s3["runs"].values()} == {"from-base", "from-rl", "from-fst"}
    assert "init_from" in (runs / "s3-from-fst-seed1" / "config.yaml").read_text()
    assert "s1-fst-seed1" in (runs / "s3-from-fst-seed1" / "config.yaml").read_text()
    # KL at step 0 is measured (on the init_from checkpoint) only for runs that start from one.
    for name in ("s3-from-fst-seed1", "s3-from-base-seed1"):
        cache_file = runs / name / "miniature_measure.json"
        cache = json.loads(cache_file.read_text())
        del cache["kl"]["0"]
        cache_file.write_text(json.dumps(cache))
    monkeypatch.setattr(mini.evaluation, "kl_to_base", lambda *a, **kw: 0.123)
    assert mini.measure_kl(runs / "s3-from-fst-seed1", ["alphabetical"], 2)[0] == {"alphabetical": 0.123}
    assert mini.measure_kl(runs / "s3-from-base-seed1", ["alphabetical"], 2)[0] == {"alphabetical": 0.0}
    monkeypatch.undo()

    # Interrupt one run after its first checkpoint: a second invocation resumes it and skips the rest.
    shutil.rmtree(runs / "s1-rl-seed0" / "checkpoints" / "step_000003")  # the newest complete one is step 1
    mini.main(argv[:1] + ["--study", "1"] + argv[1:])
    assert [s["how"] for s in segments(runs / "s1-rl-seed0")] == ["start", "resume after step 1"]
    assert all(len(segments(runs / name)) == 1 for name in s1["runs"] if name != "s1-rl-seed0")
    again = json.loads((out / "summary.json").read_text())
    assert [p["step"] for p in again["studies"]["1"]["runs"]["s1-rl-seed0"]["curves"]["add"]] == [0, 2, 4]
    assert set(again["studies"]) == {"1", "2", "3"}  # the other studies' entries are kept

    # A run folder made with other settings is never reused silently.
    spec = mini.study1_specs(mini.Sizes.quick(str(runs / "tiny-model")))[0]
    spec.overrides = spec.overrides + ["train.lr=0.5"]
    with pytest.raises(SystemExit, match="other settings"):
        mini.ensure_run(spec, runs)


def test_kl_at_matched_accuracy_interpolates_at_the_first_crossing(mini):
    curve = [{"step": 0, "accuracy": 0.1, "kl": 0.0}, {"step": 6, "accuracy": 0.3, "kl": 0.02},
             {"step": 12, "accuracy": 0.2, "kl": 0.03}, {"step": 18, "accuracy": 0.5, "kl": 0.05}]
    assert mini.kl_at_accuracy(curve, 0.2) == pytest.approx(0.01)   # halfway from step 0 to step 6
    assert mini.kl_at_accuracy(curve, 0.4) == pytest.approx(0.03 + 0.02 * 2 / 3)  # 2/3 of the way from step 12
    assert mini.kl_at_accuracy(curve, 0.05) == 0.0                  # already there at step 0
    assert mini.kl_at_accuracy(curve, 0.6) is None
    assert mini.first_reach(curve, 0.3) == 6 and mini.first_reach(curve, 0.9) is None


def test_judge_calls_differences_within_the_seed_spread_no_difference(mini):
    assert "no difference at this scale" in mini.judge("acc", "fst", [0.30, 0.40], "rl", [0.25, 0.28])
    text = mini.judge("acc", "fst", [0.50, 0.52], "rl", [0.25, 0.28])
    assert "fst is higher by 0.245" in text and "no difference" not in text
    assert "lower" in mini.judge("acc", "fst", [0.10, 0.11], "rl", [0.25, 0.28])
    assert "seed spread is unknown" in mini.judge("acc", "fst", [0.5], "rl", [0.2])
    assert "1 of 2 fst seeds never got there" in mini.judge("steps", "fst", [6, None], "rl", [12, 18])
