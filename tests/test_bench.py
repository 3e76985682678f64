"""bench/: scripts that only a lent GPU or a long quiet run would use for real run their code paths here at
toy shapes (gpu_check.py --cpu-smoke, prefix_sharing.py --tiny, the whole gpu_session.sh --smoke), so they
cannot rot in between."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT


def test_prefix_sharing_tiny_runs_every_phase_on_equal_tokens(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prefix_sharing.py"), "--tiny", "--threads", "1",
                           "--dtypes", "float32", "--contexts", "160", "--problems", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / json.loads(proc.stdout.strip().splitlines()[-1])["json"]).read_text())
    (case,) = summary["results"]
    assert case["prompts"] == 2 * 2 and len(case["prefix_rows"]) == 2  # each context's prefix is one row
    assert case["phases"].keys() == {"sample", "base", "train"}
    for phase in case["phases"].values():
        assert phase["ratio"] > 0 and phase["pairs_equal_tokens"] == phase["pairs_same_completions"] == 1
    (pair,) = case["phases"]["sample"]["repeats"]
    assert pair["on"]["prefill_tokens"] < pair["off"]["prefill_tokens"] == pair["off"]["prompt_tokens"] // 2  # G=2


def run_session(out, *args, env=()):
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
                          timeout=1500)


def test_gpu_session_smoke_runs_every_stage_ok(tmp_path):
    """bench/gpu_session.sh --smoke: the four stages of a first GPU session, on a CPU at toy shapes."""
    proc = run_session(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ok"] * 4, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0 and "GPU session summary" in proc.stdout
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert set(versions["project"].values()) == {"ok"} and summary["missing"].startswith("missing: ")
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert len(probe["checks"]) == 11 and all(c["ok"] for c in probe["checks"].values()), probe["checks"]
    assert probe["checks"]["sharing_guard"]["can_share"] == {"train": False, "eval": True}
    # issue 40's device checks: a left-padded training pass, the sampler at T = 0.05, the fp32 head's cost
    assert probe["checks"]["left_pad_training"]["layers_hooked"] == 2
    assert probe["checks"]["left_pad_training"]["pad_positions"] > 0
    assert probe["checks"]["low_temperature"]["least_likely_draw"]["top_p=1.0"] > 1e-12
    assert probe["checks"]["fp32_head_cost"]["ratio"] > 0
    # stage 3, gpu_check.py --cpu-smoke: a full step and a validation-sized call in waves
    (check,) = json.loads(next(tmp_path.glob("gpu_check-*.json")).read_text())["results"]
    assert "error" not in check and check["validation"]["waves"] == 2
    step = check["step"]
    assert step["rollouts"] == step["trained_rollouts"] == 4 and step["update_skipped"] is None
    assert math.isfinite(step["loss"]) and step["loss"] != 0 and step["seconds_step"] > 0
    assert check["sampler"]["fst_tokens_per_s"] > 0
    # the plan's peaks beside the measured ones (none on a CPU); TIS weights at step 0: 1, none capped
    assert check["validation"]["plan_gib"] > 0 and set(step["plan_gib_by_phase"]) == {"sampling", "base_kl", "training"}
    alloc = check["allocator"]
    assert min(alloc["plan_gib"].values()) > 0 and alloc["expandable_segments"] is alloc["fixed_segments"] is None
    assert abs(step["tis_weight"] - 1) < 1e-4 and step["tis_capped"] == 0
    assert "gpu_check: TIS weight" in proc.stdout
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["problems"] == [] and [r["step"] for r in e2e["runs"]["train"]] == [0, 1, 2]
    assert e2e["first"]["rc"] == e2e["resumed"]["rc"] == 0 and e2e["runs"]["rows_by_kind"]["fast"] == 1


def test_gpu_session_carries_on_after_a_failed_stage(tmp_path):
    """A stage that fails (here: killed by its timeout) is marked so, the next stage still runs, the ones
    not asked for are skipped, and the session exits 1."""
    proc = run_session(tmp_path, "--stages", "1 2", env={"GPU_SESSION_TIMEOUTS": "1 1 1 1"})
    assert proc.returncode == 1
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["failed (timeout 1s)"] * 2 + ["skipped"] * 2
    log = (tmp_path / "session.log").read_text()
    assert "stage 1: versions exit 124" in log and "stage 2: probe exit 124" in log
