"""experiments/study4.py: --quick --study 4 trains both arms from two invocations (one arm each, as two
processes share the runs), writes its summary entry, plot and README section once every record is
there, and --report-only rebuilds them from the records alone; the threshold measure counts a seed
that never gets there one validation interval past the end; the context fst deployed when it first
reached the threshold is read from the record's pool files."""
import importlib
import json
import shutil

import pytest


@pytest.fixture(scope="module")
def study4(mini):
    return importlib.import_module("study4")


def curve(accuracies, every=3, per_step=16, seed_prompt=None):
    """A validation curve as run_curves gives it: accuracy every `every` steps, rollouts per step."""
    return [{"step": i * every, "accuracy": a, "rollouts_all": i * every * per_step, "kl": 0.01 * i,
             "accuracy_seed_prompt": seed_prompt[i] if seed_prompt else a} for i, a in enumerate(accuracies)]


def test_steps_and_rollouts_to_the_threshold_and_the_censored_seed(study4):
    plan = study4.Plan(steps=18, eval_every=3)
    up = curve([0.05, 0.1, 0.19, 0.2, 0.5, 0.6, 0.7])
    assert study4.to_threshold(up, plan) == (9, True)              # 0.2 itself counts as reached
    assert study4.to_threshold(up, plan, "rollouts_all") == (144, True)
    flat = curve([0.05, 0.0, 0.1, 0.15, 0.1, 0.19, 0.1])
    assert study4.to_threshold(flat, plan) == (21, False)          # the last step plus one interval
    assert study4.to_threshold(flat, plan, "rollouts_all") == (288 + 48, False)


def test_first_lift_names_the_context_deployed_at_the_first_validation_over_the_threshold(study4, tmp_path):
    pool = study4.pool.PromptPool("Answer the question.")
    child = pool.add("Answer the question.", parent_id=0, step=3, operator="demo", scores={"a": 1.0},
                     demos=[("What is 1 + 2?", "1 + 2 = 3.\nAnswer: 3")])
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "step_000003.json").write_text(json.dumps(pool.to_json()))
    later = pool.add("Add the numbers.", parent_id=child.id, step=7, operator="reflect", scores={"a": 1.0, "b": 1.0})
    later.in_top_k = True  # RL samples with it after the round at step index 7
    (tmp_path / "pool" / "step_000007.json").write_text(json.dumps(pool.to_json()))
    # first at or over 0.2 at step 6: the pool saved after step 3 (step index 3 < 6) is what was deployed
    lift = study4.first_lift(tmp_path, curve([0.0, 0.1, 0.3, 0.5], seed_prompt=[0.0, 0.1, 0.05, 0.2]))
    assert (lift["step"], lift["operator"], lift["lineage"], lift["born"]) == (6, "demo", ["seed", "demo"], 3)
    assert lift["demos"] == [["What is 1 + 2?", "1 + 2 = 3.\nAnswer: 3"]] and lift["accuracy_seed_prompt"] == 0.05
    assert later.id != child.id
    # the child is the best from the first pool on (validations 6 and 9); RL samples with a child after round 7 only
    assert study4.children_used(tmp_path, curve([0.0, 0.1, 0.3, 0.5])) == {"deployed_at": [6, 9],
                                                                          "sampled_after_round": [7]}
    # reached before any round: the seed prompt was deployed, the weights lifted it
    assert study4.first_lift(tmp_path, curve([0.0, 0.25]))["operator"] == "seed"
    assert study4.first_lift(tmp_path, curve([0.0, 0.1, 0.19])) is None


def test_quick_study4_from_two_invocations_then_from_the_records_alone(mini, study4, tmp_path, monkeypatch):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--quick", "--study", "4", "--threads", "1", "--out", str(out), "--runs-dir", str(runs)]
    mini.main(argv + ["--study4-arms", "fst"])      # the rl records are missing: no report yet
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["s4-fst-seed0", "s4-fst-seed1"]
    mini.main(argv + ["--study4-arms", "rl"])
    summary = json.loads((out / "summary.json").read_text())
    s4 = summary["studies"]["4"]
    assert set(s4["runs"]) == {"s4-rl-seed0", "s4-rl-seed1", "s4-fst-seed0", "s4-fst-seed1"}
    config = (out / "runs" / "s4-fst-seed0" / "config.yaml").read_text()
    assert "example_in: system" in config and "format_reward: 0.0" in config and "reuse: none" in config
    assert [p["step"] for p in s4["runs"]["s4-fst-seed0"]["curves"]["add"]] == [0, 2, 4]
    first = s4["comparisons"][0]
    assert first["what"] == "RL steps to accuracy 0.2" and first["arm"] == "fst" and first["against"] == "rl"
    assert {"mean_diff", "ci95", "seeds"} <= set(first) and first["seeds"] == [0, 1]
    # the random model never gets there: every seed counts at the last step plus one interval
    for arm in ("rl", "fst"):
        p = s4["per_arm"][arm]
        if not any(p["reached"]):
            assert p["steps_to_threshold"] == [6, 6]
    assert s4["runs"]["s4-fst-seed0"]["rollouts_fast"] > 0 and s4["two_by_two_accuracy_mean"]["base"]["seed"] is not None
    assert (out / "study4_floor.png").stat().st_size > 1000
    readme = (out / "README.md").read_text()
    assert "## Study 4" in readme and "fixed before the runs" in readme and "**Answer:**" in readme

    # A fresh clone: no run folders, no model; the same numbers from the records alone.
    shutil.rmtree(runs)
    study_runs = importlib.import_module("study_runs")

    def no_model(*a, **kw):
        raise AssertionError("--report-only trained or loaded a model")
    monkeypatch.setattr(study_runs.fst, "main", no_model)
    monkeypatch.setattr(study_runs.models, "load_model", no_model)
    mini.main(argv + ["--report-only"])
    rebuilt = json.loads((out / "summary.json").read_text())["studies"]["4"]
    assert {k: v for k, v in rebuilt.items() if k not in ("report_command", "plots")} == \
        json.loads(json.dumps({k: v for k, v in s4.items() if k not in ("report_command", "plots")}))
