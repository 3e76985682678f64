"""bench/: scripts that only a lent GPU or a long quiet run would use for real run their code paths here at
toy shapes (gpu_check.py --cpu-smoke, prefix_sharing.py --tiny), so they cannot rot in between."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_cpu_smoke_runs_a_full_step(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    (result,) = summary["results"]
    assert "error" not in result, result
    step = result["step"]
    assert step["rollouts"] == step["trained_rollouts"] == 4 and step["update_skipped"] is None
    assert math.isfinite(step["loss"]) and step["loss"] != 0 and step["seconds_step"] > 0
    assert result["sampler"]["fst_tokens_per_s"] > 0
    assert len(list(tmp_path.glob("gpu_check-*.json"))) == 1


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
