"""experiments/miniature.py: --quick runs the three studies end to end on a tiny random model, records
every run (no weights, no machine paths) and writes summary.json, the README and the plots; a fresh
clone (no run folders) rebuilds the report from the records alone and runs only the seeds that have
no record; an interrupted run resumes; the numbers read off the curves (KL at matched accuracy), the
paired bootstrap and the verdicts that follow it; --dtype auto and the run names it gives."""
import importlib
import json
import shutil

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def study_runs(mini):
    return importlib.import_module("study_runs")


@pytest.fixture(scope="module")
def study_stats(mini):
    return importlib.import_module("study_stats")


@pytest.fixture(scope="module")
def studies(mini):
    return importlib.import_module("studies")


def segments(run_dir):
    return json.loads((run_dir / "miniature_run.json").read_text())["segments"]


def numbers(summary, study):
    """What a report says, without what differs between invocations (the command, the plot files)."""
    s = dict(summary["studies"][study])
    return {k: v for k, v in s.items() if k not in ("report_command", "plots")}


def test_quick_records_runs_and_a_fresh_clone_reports_from_them(mini, study_runs, tmp_path, monkeypatch):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--quick", "--threads", "1", "--out", str(out), "--runs-dir", str(runs)]
    mini.main(argv)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["quick"] and set(summary["studies"]) == {"1", "2", "3"}
    assert summary["settings"]["dtype"] == "float32" and summary["settings"]["records"] == "runs"
    for study in summary["studies"].values():
        assert study["plots"] and all((out / png).stat().st_size > 1000 for png in study["plots"])
        assert study["wall_seconds"] > 0 and all("--quick" in c for c in study["commands"])
        assert study["threads"] == [1] and study["machines"][0]["flags"].keys() == set(study_runs.CPU_FLAGS)
    readme = (out / "README.md").read_text()
    assert all(f"## Study {n}" in readme for n in (1, 2, 3)) and "no difference at this scale" in readme

    # Every run has a record: its small files, the measurements, no weights, no path of this machine.
    names = [name for s in summary["studies"].values() for name in s["runs"]]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names) and len(names) == 13
    for name in names:
        record = out / "runs" / name
        files = {p.relative_to(record).as_posix() for p in record.rglob("*") if p.is_file()}
        assert {"metrics.jsonl", "config.yaml", "miniature_run.json", "miniature_measure.json"} <= files
        assert not any(f.startswith("checkpoints") or f.endswith(".safetensors") or f == "samples.jsonl"
                       for f in files)
        for f in files:
            text = (record / f).read_text()
            assert str(tmp_path) not in text and str(ROOT) not in text, (name, f)
        log = json.loads((record / "miniature_run.json").read_text())
        assert log["dtype"] == "float32" and log["name"] == name and "--quick" in log["recorded_by"]
        assert set(log["recorded_on"]["cpu"]["flags"]) == set(study_runs.CPU_FLAGS)
    assert list((out / "runs" / "s1-fst-seed0" / "pool").glob("step_*.json"))  # the fast weights, as text
    assert str(tmp_path) not in (out / "summary.json").read_text() + readme

    s1 = summary["studies"]["1"]
    assert s1["arms"] == ["rl", "fst", "gepa"] and s1["seeds"] == [0, 1]
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
    # fst against rl on nine numbers, gepa on the six that do not need its (zero) KL
    assert [(c["arm"], c["against"]) for c in s1["comparisons"]] == [("fst", "rl")] * 9 + [("gepa", "rl")] * 6
    seed_matched = [c for c in s1["comparisons"] if c["arm"] == "fst" and "seed's matched" in c["what"]]
    assert len(seed_matched) == 3 and all(c["seeds"] == [0, 1] for c in seed_matched)  # every seed has a value
    assert set(s1["seed_matched_accuracy"]["fst"]) == {"0", "1"}  # summary.json: seeds as keys
    assert all(c["verdict"] == "n/a (one seed)" for c in s1["comparisons"] if c["arm"] == "gepa")
    assert s1["per_arm_stats"]["fst"]["final_accuracy"]["n"] == 2

    s2 = summary["studies"]["2"]
    assert [stage for stage, _ in s2["stage_ends"]] == ["compare", "word_count"]
    for r in s2["runs"].values():
        assert set(r["at_stage_end"]["compare"]) == {"compare", "word_count"}  # every task validated
    s3 = summary["studies"]["3"]
    assert {r["arm"] for r in s3["runs"].values()} == {"from-base", "from-rl", "from-fst"}
    assert "init_from" in (runs / "s3-from-fst-seed1" / "config.yaml").read_text()
    assert "s1-fst-seed1" in (out / "runs" / "s3-from-fst-seed1" / "config.yaml").read_text()
    assert s3["runs"]["s3-from-fst-seed1"]["start"] == {"run": "s1-fst-seed1", "same_validation_as_its_record": True}
    # KL at step 0 is measured (on the init_from checkpoint) only for runs that start from one.
    for name in ("s3-from-fst-seed1", "s3-from-base-seed1"):
        cache_file = runs / name / "miniature_measure.json"
        cache = json.loads(cache_file.read_text())
        del cache["kl"]["0"]
        cache_file.write_text(json.dumps(cache))
    monkeypatch.setattr(study_runs.evaluation, "kl_to_base", lambda *a, **kw: 0.123)
    assert study_runs.measure_kl(runs / "s3-from-fst-seed1", ["alphabetical"], 2)[0] == {"alphabetical": 0.123}
    assert study_runs.measure_kl(runs / "s3-from-base-seed1", ["alphabetical"], 2)[0] == {"alphabetical": 0.0}
    monkeypatch.undo()

    # Interrupt one run after its first checkpoint (and before its record): a second invocation
    # resumes it, records it, and takes every other run from its record.
    shutil.rmtree(runs / "s1-rl-seed0" / "checkpoints" / "step_000003")  # the newest complete one is step 1
    shutil.rmtree(out / "runs" / "s1-rl-seed0")
    mini.main(argv[:1] + ["--study", "1"] + argv[1:])
    assert [s["how"] for s in segments(runs / "s1-rl-seed0")] == ["start", "resume after step 1"]
    assert [s["how"] for s in segments(out / "runs" / "s1-rl-seed0")] == ["start", "resume after step 1"]
    assert all(len(segments(runs / name)) == 1 for name in s1["runs"] if name != "s1-rl-seed0")
    again = json.loads((out / "summary.json").read_text())
    assert [p["step"] for p in again["studies"]["1"]["runs"]["s1-rl-seed0"]["curves"]["add"]] == [0, 2, 4]
    assert set(again["studies"]) == {"1", "2", "3"}  # the other studies' entries are kept

    # A run folder or a record made with other settings is never reused silently.
    spec = study_runs.study1_specs(study_runs.Sizes.quick(str(runs / "tiny-model")))[0]
    spec.overrides = spec.overrides + ["train.lr=0.5"]
    with pytest.raises(SystemExit, match="other settings"):
        study_runs.ensure_run(spec, runs)
    with pytest.raises(SystemExit, match="other settings"):
        study_runs.obtain(spec, study_runs.Sizes.quick(str(runs / "tiny-model")), study_runs.Places(runs, out, "test"))

    # A fresh clone: no run folders. --report-only rebuilds the same report from the records alone,
    # without training or loading a model.
    shutil.rmtree(runs)
    before = json.loads((out / "summary.json").read_text())

    def no_model(*a, **kw):
        raise AssertionError("--report-only trained or loaded a model")
    monkeypatch.setattr(study_runs.fst, "main", no_model)
    monkeypatch.setattr(study_runs.models, "load_model", no_model)
    mini.main(argv + ["--report-only"])
    rebuilt = json.loads((out / "summary.json").read_text())
    assert all(numbers(rebuilt, s) == numbers(before, s) for s in ("1", "2", "3"))
    assert "--report-only" in rebuilt["studies"]["1"]["report_command"] and not runs.exists()
    monkeypatch.undo()

    # More seeds on the fresh clone: only seed 2's runs are trained (gepa stays on the first seed).
    mini.main(argv[:1] + ["--study", "1", "--seeds", "0", "1", "2"] + argv[1:])
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("s1-")) == ["s1-fst-seed2", "s1-rl-seed2"]
    s1 = json.loads((out / "summary.json").read_text())["studies"]["1"]
    assert s1["seeds"] == [0, 1, 2] and s1["per_arm"]["fst"]["seeds"] == [0, 1, 2]
    assert s1["comparisons"][0]["seeds"] == [0, 1, 2] and s1["comparisons"][0]["ci95"] is not None
    # Study 3 needs study 1's checkpoint, which a clone lacks: that run is trained again, and the new
    # record says whether it validated as its study-1 record did (it replays exactly: same seed).
    shutil.rmtree(out / "runs" / "s3-from-rl-seed0")
    mini.main(argv[:1] + ["--study", "3", "--seeds", "0"] + argv[1:])
    assert (runs / "s1-rl-seed0").is_dir() and not (runs / "s1-fst-seed0").exists()
    log = json.loads((out / "runs" / "s3-from-rl-seed0" / "miniature_run.json").read_text())
    assert log["start"] == {"run": "s1-rl-seed0", "same_validation_as_its_record": True}
    assert json.loads((out / "summary.json").read_text())["studies"]["3"]["starts_not_as_recorded"] == []
    metrics = out / "runs" / "s1-rl-seed0" / "metrics.jsonl"  # a start that validated otherwise is said
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    next(r for r in rows if r.get("kind") == "eval")["accuracy"] = 0.5
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec3 = next(s for s in study_runs.study3_specs(study_runs.Sizes.quick(str(runs / "tiny-model")), runs)
                 if s.name == "s3-from-rl-seed0")
    note = study_runs.start_note(spec3, study_runs.Places(runs, out, "test"))
    assert note == {"run": "s1-rl-seed0", "same_validation_as_its_record": False}
    # Without --seeds the report keeps every recorded seed; a missing record is named, not skipped.
    shutil.rmtree(out / "runs" / "s1-fst-seed2")
    with pytest.raises(SystemExit, match="no record for s1-fst-seed2"):
        mini.main(argv[:1] + ["--study", "1", "--report-only"] + argv[1:])
    with pytest.raises(SystemExit, match="no record for s1-fst-reuse-seed0, s1-fst-reuse-seed1"):
        mini.main(argv[:1] + ["--study", "1", "--report-only", "--seeds", "0", "1",
                              "--study1-arms", "rl", "fst-reuse"] + argv[1:])


def test_kl_at_matched_accuracy_interpolates_at_the_first_crossing(study_stats):
    curve = [{"step": 0, "accuracy": 0.1, "kl": 0.0}, {"step": 6, "accuracy": 0.3, "kl": 0.02},
             {"step": 12, "accuracy": 0.2, "kl": 0.03}, {"step": 18, "accuracy": 0.5, "kl": 0.05}]
    assert study_stats.kl_at_accuracy(curve, 0.2) == pytest.approx(0.01)   # halfway from step 0 to step 6
    assert study_stats.kl_at_accuracy(curve, 0.4) == pytest.approx(0.03 + 0.02 * 2 / 3)  # 2/3 of the way from step 12
    assert study_stats.kl_at_accuracy(curve, 0.05) == 0.0                  # already there at step 0
    assert study_stats.kl_at_accuracy(curve, 0.6) is None
    assert study_stats.first_reach(curve, 0.3) == 6 and study_stats.first_reach(curve, 0.9) is None


def test_seed_matched_level_is_the_highest_accuracy_both_curves_of_the_seed_reach(study_stats):
    curve = lambda *acc: [{"step": 6 * i, "accuracy": a, "kl": 0.01 * i} for i, a in enumerate(acc)]  # noqa: E731
    per_arm = {"rl": {"seeds": [0, 1]}, "fst": {"seeds": [1, 0, 2]}}
    curves = {"rl": [curve(0.1, 0.5, 0.4), curve(0.1, 0.3, 0.6)], "fst": [curve(0.2, 0.4, 0.7), curve(0.1, 0.6, 0.3), curve(0.9)]}
    assert study_stats.seed_matched_levels(per_arm, curves, "fst") == {1: 0.6, 0: 0.5}  # seed 2: no rl run to pair with
    # seed 0 at its level 0.5: fst (its second curve) gets there at step 6, rl at step 6 too
    assert study_stats.first_reach(curves["fst"][1], 0.5) == 6 and study_stats.first_reach(curves["rl"][0], 0.5) == 6


def test_paired_bootstrap_on_differences_with_known_answers(study_stats):
    assert study_stats.paired_bootstrap([0.1] * 4) == (0.1, 0.1)          # no spread: the interval is the value
    assert study_stats.paired_bootstrap([0.0, 1.0]) == (0.0, 1.0)         # 2 seeds: a quarter of resamples at each end
    lo, hi = study_stats.paired_bootstrap([-0.2, 0.1, 0.3, -0.1, 0.05])
    assert lo < 0 < hi                                              # mixed signs: the interval holds 0
    lo, hi = study_stats.paired_bootstrap([0.10, 0.20, 0.15, 0.12, 0.18, 0.11])
    assert 0.10 <= lo < 0.143 < hi <= 0.20                          # all above 0, around their mean
    assert study_stats.paired_bootstrap([0.3, -0.1, 0.2]) == study_stats.paired_bootstrap([0.3, -0.1, 0.2])  # fixed generator
    assert study_stats.paired_bootstrap([0.4]) is None and study_stats.paired_bootstrap([]) is None


def test_verdict_follows_the_interval_not_the_spread(study_stats):
    def verdict(arm, ref, **kw):
        return study_stats.compare("acc", "fst", dict(enumerate(arm)), "rl", dict(enumerate(ref)), **kw)

    # differences +0.05 and -0.08: the interval holds 0
    assert verdict([0.30, 0.40], [0.25, 0.48])["verdict"] == "no difference at this scale"
    # ahead on every one of 5 seeds, though the arms' spreads overlap: the pairing sees it
    c = verdict([0.31, 0.52, 0.40, 0.61, 0.45], [0.30, 0.50, 0.38, 0.60, 0.41])
    assert c["verdict"] == "fst ahead" and c["ci95"][0] > 0 and "fst ahead." in c["text"]
    assert verdict([0.2, 0.3], [0.4, 0.5])["verdict"] == "fst behind (a sign: 2 seeds)"
    # lower is better (KL): less is ahead
    assert verdict([0.1, 0.2, 0.1, 0.2, 0.1], [0.3, 0.4, 0.3, 0.5, 0.2], better="lower")["verdict"] == "fst ahead"
    one = verdict([0.5], [0.2])
    assert one["verdict"] == "n/a (one seed)" and "95% interval n/a (one seed)" in one["text"]
    # a seed without a value (never got there) is not dropped: nothing is compared
    never = study_stats.compare("steps", "fst", {0: 6, 1: None}, "rl", {0: 12, 1: 18}, better="lower")
    assert never["verdict"] == "not comparable" and "1 of 2 fst seeds never got there" in never["text"]
    # only the seeds both arms have are paired (gepa runs on the first seed)
    assert study_stats.compare("acc", "gepa", {0: 0.2}, "rl", {0: 0.5, 1: 0.6})["seeds"] == [0]


def test_dtype_auto_follows_the_cpu_flags_and_names_bf16_runs(study_runs):
    amx = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    plain = "processor\t: 0\nmodel name\t: AMD Ryzen\nflags\t\t: fpu avx2 avx512f\n"
    info = study_runs.cpu_info(amx)
    assert info["model"] == "Intel Xeon"
    assert info["flags"] == {"avx512_bf16": False, "amx_bf16": True, "amx_tile": True, "avx512f": True}
    assert study_runs.resolve_dtype("auto", info) == "bfloat16"
    assert study_runs.resolve_dtype("auto", study_runs.cpu_info("flags : avx512_bf16")) == "bfloat16"
    assert study_runs.resolve_dtype("auto", study_runs.cpu_info(plain)) == "float32"
    assert study_runs.resolve_dtype("auto", study_runs.cpu_info("")) == "float32"   # no /proc/cpuinfo: not Linux
    assert study_runs.resolve_dtype("bfloat16", study_runs.cpu_info(plain)) == "bfloat16"

    fp32 = study_runs.study1_specs(study_runs.Sizes())
    bf16 = study_runs.study1_specs(study_runs.Sizes(dtype="bfloat16"))
    assert fp32[0].name == "s1-rl-seed0" and not any("model.dtype" in o for o in fp32[0].overrides)
    assert bf16[0].name == "s1-rl-seed0-bf16" and "model.dtype=bfloat16" in bf16[0].overrides
    s3 = study_runs.study3_specs(study_runs.Sizes(dtype="bfloat16"), ROOT / "runs")
    assert [s.start for s in s3 if s.arm == "from-fst"] == ["s1-fst-seed0-bf16", "s1-fst-seed1-bf16"]
    assert study_runs.NAME.match("s1-fst-reuse-seed3-bf16").group("arm", "seed", "dtype") == ("fst-reuse", "3", "-bf16")


def test_bf16_runs_are_set_against_their_float32_twins_and_the_seed_spread(studies):
    fp32 = {"rl": {0: {"final_accuracy": 0.60, "final_kl": 0.10}, 1: {"final_accuracy": 0.70, "final_kl": 0.20},
                   2: {"final_accuracy": 0.80, "final_kl": 0.30}},          # sd 0.1 in both numbers
            "fst": {0: {"final_accuracy": 0.50, "final_kl": 0.05}}}         # one seed: no spread
    bf16 = {"rl": {0: {"final_accuracy": 0.65, "final_kl": 0.25}, 5: {"final_accuracy": 0.9, "final_kl": 0.1}},
            "fst": {0: {"final_accuracy": 0.55, "final_kl": None}}}
    rows = studies.against_float32(bf16, fp32)
    assert [(r["arm"], r["seed"]) for r in rows] == [("rl", 0), ("fst", 0)]   # seed 5 has no float32 twin
    rl, fst = rows
    assert rl["final_accuracy"]["diff"] == pytest.approx(0.05)
    assert rl["final_accuracy"]["float32_seed_sd"] == pytest.approx(0.1)
    assert rl["final_accuracy"]["within_spread"] is True             # 0.05 <= 0.1
    assert rl["final_kl"]["diff"] == pytest.approx(0.15) and rl["final_kl"]["within_spread"] is False
    assert fst["final_accuracy"]["within_spread"] is None             # no spread to compare with
    assert fst["final_kl"]["diff"] is None and fst["final_kl"]["within_spread"] is None


def test_fst_reuse_arm_is_fst_with_the_pool_reused(study_runs):
    specs = study_runs.study1_specs(study_runs.Sizes(study1_arms=("rl", "fst-reuse"), seeds=(0, 1, 2)))
    reuse = [s for s in specs if s.arm == "fst-reuse"]
    assert [s.name for s in reuse] == ["s1-fst-reuse-seed0", "s1-fst-reuse-seed1", "s1-fst-reuse-seed2"]
    assert all("mode=fst" in s.overrides and "fast.reuse=all" in s.overrides and s.two_by_two for s in reuse)
    assert study_runs.Sizes().study1_arms == ("rl", "fst", "gepa")
