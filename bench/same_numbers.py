"""bench/same_numbers.py -- one job: show that two versions of fst compute the same numbers.

    python bench/same_numbers.py --old 174b39c                 # that commit vs this working tree
    python bench/same_numbers.py --old HEAD~3 --new HEAD       # two commits
    python bench/same_numbers.py --old HEAD --model DIR        # another model (folder, .gguf or alias)

For a refactor: each version is a copy of the code (`git archive REV` unpacked in a temp folder; the
default `--new .` is this working tree as it is) and runs, in its own process, a short run of
configs/tiny.yaml in rl and in fst mode: 3 steps, a fast round after step 1, validation before step 0
and after step 3, completions of at most 48 tokens (the tiny config: 64), so it takes minutes on a
CPU. Then metrics.jsonl, samples.jsonl and pool/*.json of the two versions are compared row by row with
the timing fields left out. Exit status 0 when everything agrees; else the first difference of each
file is printed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def is_timing(key: str) -> bool:
    """Fields that depend on wall-clock time, not on the computation (seconds_*, tokens_per_s)."""
    return key.startswith("seconds") or key == "tokens_per_s"


SETTINGS = {"train.steps": 3, "train.save_every": 100, "sampling.group_size": 8, "sampling.max_new_tokens": 48,
            "fast.every": 2, "fast.budget": 2, "fast.reflector_max_new_tokens": 48,
            "eval.every": 3, "eval.n": 2, "eval.k": 2,
            # pinned: configs/tiny.yaml moved from arithmetic to add and to the paragraph reflector (Dec 2026),
            # so versions on either side of that change still run the same config
            "task.name": "add", "task.system_prompt": "", "fast.reflector_format": "fenced"}


def code_of(rev: str, dest: Path) -> Path:
    """The code of `rev` unpacked into dest; "." is this working tree, used in place."""
    if rev == ".":
        return ROOT
    if Path(rev).is_dir():  # a folder holding a version (e.g. a copy with one change reverted)
        return Path(rev).resolve()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as f:
        f.extractall(dest, filter="data")
    return dest


def run(code: Path, out: Path, mode: str, model: str | None, threads: int) -> Path:
    sets = SETTINGS | {"mode": mode, "out_dir": str(out), "run_name": mode} | ({"model.name": model} if model else {})
    cmd = [sys.executable, "fst.py", "--config", "tiny.yaml"] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[same_numbers] {code} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return out / mode


def rows_of(path: Path) -> list:
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
    return [{k: v for k, v in r.items() if not is_timing(k)} if isinstance(r, dict) else r for r in rows]


def _common(row, other):
    """`row` without the fields `other` lacks, at any depth."""
    if isinstance(row, dict) and isinstance(other, dict):
        return {k: _common(v, other[k]) for k, v in row.items() if k in other}
    return row


def _fields_in_one(old, new, prefix: str = "") -> set[str]:
    """The fields, at any depth (dotted), that only one of two rows writes, each marked with its side."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return set()
    out = {f"{prefix}{k} ({'new' if k in new else 'old'})" for k in set(old) ^ set(new)}
    for k in set(old) & set(new):
        out |= _fields_in_one(old[k], new[k], f"{prefix}{k}.")
    return out


def compare(old: Path, new: Path) -> list[str]:
    """One line per compared file: 'same' or its first difference."""
    names = sorted({p.relative_to(old).as_posix() for p in old.glob("pool/*.json")}
                   | {p.relative_to(new).as_posix() for p in new.glob("pool/*.json")})
    lines = []
    for name in ["metrics.jsonl", "samples.jsonl"] + names:
        a, b = old / name, new / name
        if not (a.exists() and b.exists()):
            lines.append(f"DIFFERENT {name}: only in {'new' if b.exists() else 'old'}")
            continue
        ra, rb = rows_of(a), rows_of(b)
        # A field only one version writes (a new metric, a new counter inside one) is listed, not compared:
        # the question is whether the numbers both versions compute agree.
        only = sorted(set().union(*(_fields_in_one(x, y) for x, y in zip(ra, rb))))
        if only:
            lines.append(f"fields    {name}: only in one version, not compared: {', '.join(only)}")
            ra, rb = [_common(x, y) for x, y in zip(ra, rb)] + ra[len(rb):], [_common(y, x) for x, y in zip(ra, rb)] + rb[len(ra):]
        diff = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None)
        if diff is None and len(ra) == len(rb):
            lines.append(f"same      {name} ({len(ra)} rows)")
        elif diff is None:
            lines.append(f"DIFFERENT {name}: {len(ra)} rows (old) vs {len(rb)} (new)")
        else:
            keys = sorted(k for k in set(ra[diff]) | set(rb[diff]) if ra[diff].get(k) != rb[diff].get(k))
            lines.append(f"DIFFERENT {name} row {diff}: " + "; ".join(
                f"{k}: {ra[diff].get(k)!r} (old) vs {rb[diff].get(k)!r} (new)" for k in keys)[:2000])
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="a git revision")
    ap.add_argument("--new", default=".", help="a git revision, a folder, or . for this working tree (default)")
    ap.add_argument("--model", help="model.name for both (default: the tiny config's smollm2-135m)")
    ap.add_argument("--modes", nargs="+", default=["rl", "fst"], choices=["rl", "fst", "gepa"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the same for both versions)")
    a = ap.parse_args()
    same = True
    with tempfile.TemporaryDirectory(prefix="fst-same-") as tmp:
        tmp = Path(tmp)
        code = {side: code_of(rev, tmp / f"code-{side}") for side, rev in (("old", a.old), ("new", a.new))}
        for mode in a.modes:
            runs = {side: run(code[side], tmp / f"runs-{side}", mode, a.model, a.threads) for side in ("old", "new")}
            train = [r for r in rows_of(runs["new"] / "metrics.jsonl") if r.get("kind") == "train"]
            updated = sum(r.get("entropy") is not None and r.get("update_skipped") is None for r in train)
            print(f"{mode}: {a.old} (old) vs {a.new} (new); {updated} of {len(train)} steps ran an update")
            for line in compare(runs["old"], runs["new"]):
                print("  " + line)
                same &= line.startswith(("same", "fields"))
    print("the same numbers" if same else "the numbers DIFFER")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
