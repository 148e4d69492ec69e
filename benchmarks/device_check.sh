#!/usr/bin/env bash
# Every GPU measurement of this project, in one run on one CUDA GPU (PyTorch with CUDA; no
# TensorRT, no onnxruntime-gpu needed), in under 10 minutes:
#
#   1. curve     the step-cost curve of a Qwen2.5-1.5B-shaped bf16 model under CUDA graphs, widths
#                1 (AR step) .. 272 (b = 16, dense proposals), plus the sparse proposal sets
#                (benchmarks/gpu_step_cost.py --skip-demo)
#   2. curve135  the same curve for the SmolLM2-135M shape (the model the project ships a draft
#                adapter for), bf16, b = 2 .. 16 and the sparse sets of b = 2 and 3
#   3. demo      the demo model's AR vs TiDAR tokens/s under CUDA graphs, at its own block size
#                and b = 2, 4, 8 (benchmarks/gpu_step_cost.py, demo part only)
#   4. cuda      the ctypes CUDA helper of the TensorRT/ORT-CUDA backends on the hardware: pinned
#                round trip, strided 2-D copy, a captured graph replayed (tests/test_trt.py)
#
# Usage: benchmarks/device_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR default: device-check-out)
#
# Each step has its own time limit (CURVE_S, CURVE135_S, DEMO_S, CUDA_S seconds; 300 + 90 + 120 + 60
# by default)
# and a failed or timed-out step does not stop the others. OUT_DIR receives <step>.json,
# <step>.md and <step>.log per step, and summary.json + summary.md: per step its status (ok,
# failed, timeout, skipped), seconds, command and, when it did not pass, the last lines of its
# log. Exit status 0 when every step passed, 1 otherwise.
#
# --dry-run: the same steps, code paths and output files on the CPU, at toy sizes (tiny
# preset, eager, no CUDA graphs): a check of the script, not a measurement (summary.json says
# "dry_run": true). tests/test_device_check.py runs it.
#
# The package need not be installed: the repository's three source folders are linked under
# their import names in a temp dir put first on PYTHONPATH (this checkout's code is what runs).
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-device-check-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

# This checkout's code first, installed or not: its three source folders under their import names.
SHIM="$(mktemp -d)"
ln -s "$ROOT/tidar_export" "$SHIM/tidar_export"
ln -s "$ROOT/graphs" "$SHIM/tidar_graphs"
ln -s "$ROOT/runtime" "$SHIM/tidar_runtime"
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
trap '[ -n "$SHIM" ] && rm -rf "$SHIM"' EXIT

if [ "$DRY" = 1 ]; then
    CURVE_ARGS=(--allow-cpu --preset tiny --dtype fp32 --max-len 64 --block-sizes 2-3 --sparse 4:1 --iters 2)
    CURVE135_ARGS=(--allow-cpu --preset smollm2-135m --dtype fp32 --max-len 32 --block-sizes 2 --sparse 2:1 --iters 1)
    DEMO_ARGS=(--allow-cpu --num-prompts 1 --prompt-len 8 --max-new-tokens 8 --repeats 1 --demo-block-sizes 2)
    CURVE_S="${CURVE_S:-120}"; CURVE135_S="${CURVE135_S:-120}"; DEMO_S="${DEMO_S:-120}"; CUDA_S="${CUDA_S:-120}"
else
    CURVE_ARGS=(--preset qwen2.5-1.5b --dtype bf16 --max-len 2048 --block-sizes 2-16 --iters 50)
    CURVE135_ARGS=(--preset smollm2-135m --dtype bf16 --max-len 2048 --block-sizes 2-16 --sparse 2:1 --sparse 3:1
                   --sparse 3:1,2 --iters 50)
    DEMO_ARGS=(--demo-block-sizes 2,4,8,16 --num-prompts 8 --prompt-len 32 --max-new-tokens 96 --repeats 5)
    CURVE_S="${CURVE_S:-300}"; CURVE135_S="${CURVE135_S:-90}"; DEMO_S="${DEMO_S:-120}"; CUDA_S="${CUDA_S:-60}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

STEPS=()
# run NAME LIMIT_S CMD...: one step, its output in $OUT/NAME.log, its record in $OUT/NAME.status
run() {
    local name="$1" limit="$2"; shift 2
    local t0 t1 rc status
    echo "== $name (limit ${limit}s): $*" >&2
    t0=$(date +%s%N)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    # a benchmark that found no CUDA says "skipped: ..."; a pytest step that only skipped says so too
    if [ "$status" = ok ] && { grep -q "^skipped:" "$OUT/$name.log" ||
        { grep -q " skipped" "$OUT/$name.log" && ! grep -q " passed" "$OUT/$name.log"; }; }; then
        status=skipped
    fi
    printf '%s\n%s\n%s\n%s\n' "$status" "$rc" "$(( (t1 - t0) / 1000000 ))" "$*" >"$OUT/$name.status"
    echo "   $name: $status" >&2
    STEPS+=("$name")
}

"$PY" - "$OUT/environment.json" <<'EOF' || true
import json, platform, sys
info = {"python": platform.python_version(), "machine": platform.machine()}
try:
    import torch
    info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as e:  # no torch: every step will say so
    info["torch_error"] = f"{type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF

run curve "$CURVE_S" "$PY" benchmarks/gpu_step_cost.py "${CURVE_ARGS[@]}" --skip-demo \
    --json "$OUT/curve.json" --markdown "$OUT/curve.md"
run curve135 "$CURVE135_S" "$PY" benchmarks/gpu_step_cost.py "${CURVE135_ARGS[@]}" --skip-demo \
    --json "$OUT/curve135.json" --markdown "$OUT/curve135.md"
run demo "$DEMO_S" "$PY" benchmarks/gpu_step_cost.py "${DEMO_ARGS[@]}" --demo-only \
    --json "$OUT/demo.json" --markdown "$OUT/demo.md"
if [ "$DRY" = 1 ]; then
    # the CPU side of the same helper: its bindings resolve or fail in one line without a GPU
    run cuda "$CUDA_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_trt.py -k "cuda_errors or missing_cuda_runtime"
else
    run cuda "$CUDA_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_trt.py -k "cuda_copies_and_graph_replay_on_a_gpu" -rs
fi

"$PY" - "$OUT" "$DRY" "${STEPS[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, dry, steps = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").is_file() else {}
records = []
for name in steps:
    status, rc, seconds, command = (out / f"{name}.status").read_text().split("\n")[:4]
    rec = {"step": name, "status": status, "exit_code": int(rc), "seconds": round(int(seconds) / 1000, 1),
           "command": command, "json": f"{name}.json" if (out / f"{name}.json").is_file() else None,
           "markdown": f"{name}.md" if (out / f"{name}.md").is_file() else None, "log": f"{name}.log"}
    if status != "ok":
        rec["log_tail"] = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    records.append(rec)
summary = {"dry_run": dry, "environment": env, "steps": records,
           "ok": all(r["status"] == "ok" for r in records),
           "total_seconds": round(sum(r["seconds"] for r in records), 1)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
head = ("Dry run on the CPU (toy sizes, eager): a check of the script, not a measurement."
        if dry else f"Device check on {env.get('gpu') or 'no GPU'} (torch {env.get('torch')}, CUDA {env.get('cuda')}).")
lines = [head, "", "| step | status | seconds | output |", "|---|---|---|---|"]
lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['markdown'] or r['log']} |" for r in records]
for r in records:
    if r["markdown"]:
        lines += ["", f"## {r['step']}", "", (out / r["markdown"]).read_text().rstrip()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:4 + len(records)]))
sys.exit(0 if summary["ok"] else 1)
EOF
