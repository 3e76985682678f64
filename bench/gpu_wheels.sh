#!/usr/bin/env bash
# bench/gpu_wheels.sh -- one job: download into .whl/ the wheels a lent GPU machine lacks (it has no network;
# its image: Python 3.12, torch 2.11+cu130, transformers 5.17, peft, no bitsandbytes / math-verify /
# flash-attn), and say whether they fit the device tool's 64 MiB (the working tree travels too).
#
#   bash bench/gpu_wheels.sh            # then: the device tool's run with carry [".whl"] (bench/README.md)
#
# Versions are requirements.txt's pins. bench/gpu_session.sh installs them with pip --no-index --target.
# flash-attn is left out: PyPI has no wheel of it (a source build against the card's CUDA), and fst runs
# on PyTorch's SDPA without it.
set -eu
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
pin() { grep -E "^$1==" requirements.txt | sed -E 's/[[:space:]]*#.*//; s/[[:space:]]+$//'; }
# Their own needs are named too (pip download --no-deps fetches none): math-verify's two (sympy is on the
# card), and regex, which transformers 5.23 checks at import (>= 2025.10.22) and the card's may predate.
WANT=("$(pin bitsandbytes)" "$(pin math-verify)" latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
      "$(pin transformers)" "$(pin peft)" regex==2026.5.9)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
mkdir -p .whl
grep -qx '/.whl/' .gitignore 2>/dev/null || echo '/.whl/' >> .git/info/exclude 2>/dev/null || true
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WANT[@]}"
# keep one version of each package: two of one name stop the whole install there
ls .whl/*.whl | awk -F/ '{print $NF}' | awk -F- '{print $1}' | sort | uniq -d | while read -r dup; do
  echo "gpu_wheels.sh: two versions of $dup in .whl/: remove the older one" >&2
done
limit=$((64 * 1024 * 1024))
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
for w in .whl/*.whl; do printf '  %8.1f MiB  %s\n' "$(echo "$(stat -c %s "$w") / 1048576" | bc -l)" "${w#.whl/}"; done
printf 'wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a device call carries: %s\n' \
  "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "($wheels + $tree) / 1048576" | bc -l)" \
  "$([ $((wheels + tree)) -le $limit ] && echo fits || echo 'DOES NOT FIT: drop bitsandbytes (stage 2 and 3 then run without 4-bit)')"
