"""bench/gpu_session_versions.py -- one job: stage 1 of bench/gpu_session.sh, what this machine has.

    python bench/gpu_session_versions.py --out bench/out/gpu [--smoke]

Python, torch, CUDA and the device (name, memory), the versions of transformers, peft, bitsandbytes,
math_verify and flash_attn (each imported, not only looked up), and the project's modules imported.
Prints ONE line naming what is missing against requirements.txt's pins (bitsandbytes, math-verify,
flash-attn, transformers, peft), writes versions.json, and exits 1 when the project cannot run at all
(torch or a project module does not import, or no CUDA device outside --smoke).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# (import name, distribution name); flash-attn is optional (requirements-gpu.txt), the rest are pinned
PACKAGES = [("transformers", "transformers"), ("peft", "peft"), ("bitsandbytes", "bitsandbytes"),
            ("math_verify", "math-verify"), ("flash_attn", "flash-attn")]
PROJECT = ["plumbing.startup", "plumbing.runlog", "pool", "rollout", "rewards", "context_opt", "fst", "eval"]


def pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """requirements.txt's `name==version` lines -> {name: version}."""
    found = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+)", line):
            found[m.group(1).lower()] = m.group(2)
    return found


def imported(module: str, dist: str | None = None) -> tuple[str | None, str | None]:
    """(version, None) when `module` imports, else (None, the one-line reason)."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # a broken install (a wheel for another CUDA, say) is as missing as an absent one
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    try:
        return importlib.metadata.version(dist or module), None
    except importlib.metadata.PackageNotFoundError:
        return getattr(mod, "__version__", None) or "?", None


def torch_facts(smoke: bool) -> dict:
    import torch
    facts = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {"device": props.name, "device_count": torch.cuda.device_count(),
                  "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                  "bf16": torch.cuda.is_bf16_supported()}
    elif not smoke:
        facts["problem"] = "no CUDA device visible (torch.cuda.is_available() is False)"
    return facts


def missing_line(packages: dict, want: dict[str, str]) -> str:
    """One line: which of the packages the GPU recipe wants are missing or not at their pin."""
    gaps = []
    for module, dist in PACKAGES:
        have, pin = packages[module]["version"], want.get(dist)
        if have is None and dist == "flash-attn":  # PyPI has no wheel of it; the recipe runs on SDPA
            gaps.append("flash-attn (optional: SDPA instead)")
        elif have is None:
            gaps.append(f"{dist} (missing{', pinned ' + pin if pin else ''})")
        elif pin and have != pin:
            gaps.append(f"{dist} {have} (pinned {pin})")
    return "missing: " + (", ".join(gaps) if gaps else "nothing")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu"))
    ap.add_argument("--smoke", action="store_true", help="a CPU machine: no CUDA device is no failure")
    a = ap.parse_args()
    report = {"python": platform.python_version(), "executable": sys.executable}
    try:
        report |= torch_facts(a.smoke)
    except Exception as e:
        report["problem"] = f"torch does not import: {type(e).__name__}: {e}"
    packages = {}
    for module, dist in PACKAGES:
        version, why = imported(module, dist)
        packages[module] = {"version": version, **({"error": why} if why else {})}
    report["packages"] = packages
    report["project"] = {m: imported(m)[1] or "ok" for m in PROJECT}
    report["missing"] = missing_line(packages, pins())
    broken = [m for m, v in report["project"].items() if v != "ok"]
    if broken and "problem" not in report:
        report["problem"] = f"project modules do not import: {', '.join(broken)}"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "versions.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "packages"}, indent=1), file=sys.stderr)
    print(report["missing"])
    if "problem" in report:
        raise SystemExit(f"[versions] {report['problem']}")


if __name__ == "__main__":
    main()
