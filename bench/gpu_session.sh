#!/usr/bin/env bash
# bench/gpu_session.sh -- one job: the first session on a lent GPU, in four stages, each under its own
# timeout, each writing into one output folder, the next one running whatever the last one did:
#   1 versions  python, torch, CUDA, the device, transformers/peft/bitsandbytes/math_verify/flash_attn, the
#               project's modules; first installs the wheels in .whl/ (bench/gpu_wheels.sh) when there
#   2 probe     bench/gpu_session_probe.py: device bugs on toy shapes with the real vocabulary (seconds),
#               among them a left-padded training pass on SDPA, the sampler at T = 0.05, the fp32 head's cost
#   3 gpu_check bench/gpu_check.py at Qwen2.5-1.5B shapes: contexts sharing 160 tokens, one RL step,
#               a 200 x 4 validation call, peak allocated and reserved memory against the memory plan (and
#               with expandable segments on, then off), the step's TIS weights
#   4 e2e       bench/gpu_session_e2e.py: fst.py on a random 1.5B-shaped model and synthetic GSM8K, a fast
#               round, a checkpoint, then --resume
# and a one-screen summary (stage: ok / failed / skipped, seconds), also written as summary.json.
#
#   bash bench/gpu_session.sh                 # on the GPU; output in $OUT/gpu (device tool) or bench/out/gpu
#   bash bench/gpu_session.sh --smoke         # the same stages on a CPU at toy shapes (CI; GPU_SESSION_SMOKE=1)
#   bash bench/gpu_session.sh --out DIR --stages "1 2"
# Timeouts (seconds) per stage, summing to under the device tool's 600 s a command:
# GPU_SESSION_TIMEOUTS="60 60 270 180" (the default on a GPU; 300 each in smoke mode).
# Exit status: 0 when every stage that ran was ok, else 1.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=${GPU_SESSION_SMOKE:-0}
OUTDIR=""
STAGES="1 2 3 4"
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) OUTDIR=$2; shift ;;
    --stages) STAGES=$2; shift ;;
    -h|--help) sed -n '2,/^set/{/^#/p}' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUTDIR" ]; then
  if [ -n "${OUT:-}" ]; then OUTDIR=$OUT/gpu; else OUTDIR=$ROOT/bench/out/gpu; fi
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR"/{versions,probe,e2e,summary}.json "$OUTDIR"/gpu_check-*.json  # no stale result reads as this run's
# on the card the four must end inside the device tool's 600 s; a CPU smoke run has no such bound
if [ "$SMOKE" = 1 ]; then DEFAULT_TIMEOUTS="300 300 300 300"; else DEFAULT_TIMEOUTS="60 60 270 180"; fi
read -r -a TIMEOUTS <<< "${GPU_SESSION_TIMEOUTS:-$DEFAULT_TIMEOUTS}"
NAMES=(versions probe gpu_check e2e)
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
PY=${PYTHON:-python3}
LOG=$OUTDIR/session.log
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True LC_ALL=C
cd "$ROOT" || exit 1

install_wheels() {
  # The card has no network: wheels travel in .whl/ (the device tool's carry) and go to a private
  # site folder that PYTHONPATH puts before the image's own packages (the pinned transformers, peft).
  local site=${GPU_SESSION_SITE:-${TMPDIR:-/tmp}/fst-site}
  if [ "$SMOKE" = 1 ]; then echo "[session] wheels: not installed in smoke mode"; return 0; fi
  if ! ls .whl/*.whl >/dev/null 2>&1; then echo "[session] wheels: no .whl/ folder, nothing installed"; return 0; fi
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "[session] wheels: pip install failed"; return 1; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  echo "[session] wheels: installed $(ls .whl/*.whl | wc -l) into $site"
}

stage_cmd() {  # CMD=(the stage's command line)
  case $1 in
    1) CMD=("$PY" bench/gpu_session_versions.py --out "$OUTDIR" "${SMOKE_FLAG[@]}") ;;
    2) CMD=("$PY" bench/gpu_session_probe.py --out "$OUTDIR" "${SMOKE_FLAG[@]}") ;;
    3) CMD=("$PY" bench/gpu_check.py --prompt-mode contexts --out "$OUTDIR")
       if [ "$SMOKE" = 1 ]; then CMD+=(--cpu-smoke --val-problems 3)
       else CMD+=(--models qwen2.5-1.5b --repeats 1 --val-problems 200 --val-k 4); fi ;;
    4) CMD=("$PY" bench/gpu_session_e2e.py --out "$OUTDIR" "${SMOKE_FLAG[@]}") ;;
  esac
}

declare -A STATUS SECONDS_TAKEN
for i in 1 2 3 4; do STATUS[$i]=skipped; SECONDS_TAKEN[$i]=0; done
for i in $STAGES; do
  name=${NAMES[$((i - 1))]}
  limit=${TIMEOUTS[$((i - 1))]}
  start=$(date +%s%N)
  {
    echo "===== stage $i: $name (timeout ${limit}s, $(date -u +%H:%M:%S) UTC)"
    rc=0
    if [ "$i" = 1 ]; then install_wheels || rc=1; fi
    # stage 1 prints one stdout line, "missing: ...": the summary repeats it
    stage_cmd "$i"
    timeout -k 10 "$limit" "${CMD[@]}" || rc=$?
    echo "===== stage $i: $name exit $rc"
    echo "$rc" > "$OUTDIR/.rc"
  } 2>&1 | tee -a "$LOG"
  # the wheels' PYTHONPATH must reach the later stages: set it here too (the block above ran in a pipe)
  if [ "$i" = 1 ] && [ "$SMOKE" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH=${GPU_SESSION_SITE:-${TMPDIR:-/tmp}/fst-site}${PYTHONPATH:+:$PYTHONPATH}
  fi
  rc=$(cat "$OUTDIR/.rc"); rm -f "$OUTDIR/.rc"
  case $rc in 0) STATUS[$i]=ok ;; 124|137) STATUS[$i]="failed (timeout ${limit}s)" ;; *) STATUS[$i]="failed (exit $rc)" ;; esac
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  SECONDS_TAKEN[$i]=$((ms / 1000)).$(( (ms % 1000) / 100 ))
done

missing=$(grep -m1 '^missing: ' "$LOG" || echo "missing: (stage 1 did not say)")
{
  echo
  echo "===== GPU session summary ($([ "$SMOKE" = 1 ] && echo "CPU smoke" || echo GPU), output in $OUTDIR)"
  for i in 1 2 3 4; do printf '  %d %-10s %-26s %6.1f s\n' "$i" "${NAMES[$((i - 1))]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"; done
  echo "  $missing"
  for f in "$OUTDIR"/probe.json; do
    [ -f "$f" ] && "$PY" -c 'import json,sys; c=json.load(open(sys.argv[1]))["checks"]; bad=[k for k,v in c.items() if not v["ok"]]; print("  probe: %d/%d checks ok%s" % (len(c)-len(bad), len(c), "; failed: " + "; ".join(k + " (" + c[k]["error"][:90] + " at " + c[k].get("where", "") + ")" for k in bad) if bad else ""))' "$f"
  done
  for f in "$OUTDIR"/gpu_check-*.json; do  # plan against reserved memory, TIS weights at step 0
    [ -f "$f" ] && "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; s=r.get("step", {}); a=r.get("allocator", {})
print("  gpu_check: TIS weight %s, capped %s; reserved within plan: expandable %s, fixed %s" % (s.get("tis_weight"), s.get("tis_capped"), *((a.get(k) or {}).get("within_plan") for k in ("expandable_segments", "fixed_segments"))))' "$f"
  done
} | tee -a "$LOG"
"$PY" - "$OUTDIR" "$SMOKE" "$missing" "${NAMES[@]}" -- "${STATUS[1]}" "${STATUS[2]}" "${STATUS[3]}" "${STATUS[4]}" \
  "${SECONDS_TAKEN[1]}" "${SECONDS_TAKEN[2]}" "${SECONDS_TAKEN[3]}" "${SECONDS_TAKEN[4]}" <<'EOF'
import json, sys
out, smoke, missing, *rest = sys.argv[1:]
names, values = rest[:rest.index("--")], rest[rest.index("--") + 1:]
status, seconds = values[:4], values[4:]
stages = [{"stage": i + 1, "name": n, "status": s, "seconds": round(float(t), 1)}
          for i, (n, s, t) in enumerate(zip(names, status, seconds))]
json.dump({"smoke": smoke == "1", "missing": missing, "stages": stages}, open(f"{out}/summary.json", "w"), indent=1)
EOF
for i in $STAGES; do [ "${STATUS[$i]}" = ok ] || exit 1; done
exit 0
