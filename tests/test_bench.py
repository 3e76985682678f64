"""bench/: the GPU check runs its code path on a CPU (--cpu-smoke), so the script, which only a lent GPU
runs for real, cannot rot between lends."""
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
