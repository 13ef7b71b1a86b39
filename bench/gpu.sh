#!/usr/bin/env bash
# Every GPU benchmark and check, in one call on a lent H200 (torch, transformers, safetensors,
# pyyaml; no Ray, pydantic or network: only moray.model and moray.parallel are imported).
#
#   bash bench/gpu.sh              # on the GPU machine; logs and JSON under $OUT (default bench/results/gpu)
#   bash bench/gpu.sh --dry-run    # print the plan, check imports and presets, run nothing heavy
#   bash bench/gpu.sh --cpu-smoke  # the same steps on this CPU at toy sizes: checks the plumbing
#
# Steps (each under its own timeout; a failing step does not stop the next):
#   1. bench/gpu_checks.py: grouped_mm bf16 on ragged groups, flash+MQA, moray vs HF (fp32 and
#      bf16 relative error, gradients, KV decode), torch.compile fullgraph
#   2. bench/model_step.py on configs/bench-moe.yaml, bf16: moray vs MixtralForCausalLM
#   3. bench/pretrain_step_gpu.py: TrainEngine's bf16 step (bf16 weights, fp32 master + AdamW), with
#      parallel.sequence_parallel on as gpt4.yaml trains (at tp 1 a no-op, recorded in the JSON), on
#      bench-moe: fails unless every expert product is torch._grouped_mm (no per-expert loop) and a
#      step's host syncs are fewer than its MoE layers; MFU beside HF Mixtral + AdamW, and their ratio
#   4. bench/serve_decode_gpu.py: the serving engine's decode with CUDA graphs, without, and HF
#      generate at batch 1 / 16 / 64 on bench-moe; batch 1 against the memory-bandwidth bound
#   5. bench/model_step.py --compile: adds torch.compile(moray)
# At most 6 files land in $OUT (the device tool brings back 8): gpu.log and one JSON per step.
# GPU_STEPS="gpu_checks model_step" runs a subset. The step limits add up to more than one
# device call's 10 minutes, so the optional compile step comes last: whatever finished is in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run|--cpu-smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait $TEE_PID' EXIT  # the log is complete before the call returns

declare -a SUMMARY=()
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  if [[ -n ${GPU_STEPS:-} && " $GPU_STEPS " != *" $name "* ]]; then SUMMARY+=("not run  $name"); return; fi
  echo
  echo "==== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  if [[ $MODE == dry ]]; then SUMMARY+=("plan  $name"); return; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local verdict=ok
  [[ $rc -ne 0 ]] && { verdict="FAILED rc=$rc"; [[ $rc -eq 124 ]] && verdict="TIMED OUT"; FAILED=1; }
  SUMMARY+=("$(printf '%-8s %-22s %4ss' "$verdict" "$name" $((SECONDS - t0)))")
}

echo "==== environment ($MODE mode) $(date -u)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for mod in ("transformers", "safetensors", "yaml", "pyarrow", "moray.model", "moray.model.hf", "moray.parallel"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:<16} {getattr(m, '__version__', 'ok')}")
    except Exception as err:  # noqa: BLE001
        print(f"  {mod:<16} MISSING ({type(err).__name__}: {err})")
for banned in ("ray", "pydantic", "fastapi"):
    if banned in sys.modules:
        print(f"  WARNING: {banned} was imported; the GPU machine has none")
sys.path.insert(0, "bench")
from model_common import model_config
from moray.model import count_params
for preset in ("bench-moe", "bench-cpu"):
    cfg, train = model_config(f"configs/{preset}.yaml")
    n = count_params(cfg)
    print(f"  {preset}: {n.total/1e9:.2f}B total, {n.active/1e9:.3f}B active, train {train}")
EOF
[[ $? -ne 0 ]] && { echo "environment check failed"; exit 1; }

if [[ $MODE == cpu ]]; then
  CHECKS=(--device cpu --layers 1)
  STEP=(--device cpu --config configs/tiny.yaml --batch 2 --seq 64 --warmup 1 --steps 2)
  COMPILE_STEP=("${STEP[@]}" --no-hf)
  PRETRAIN=(--device cpu --dtype bfloat16 --config configs/tiny.yaml --batch 2 --seq-len 64 --warmup 1 --steps 2
            --sequence-parallel)
  DECODE=(--device cpu --config configs/tiny.yaml --smoke --batches 1,4)
else
  CHECKS=(--device cuda)
  STEP=(--device cuda --config configs/bench-moe.yaml --warmup 3 --steps 10)
  COMPILE_STEP=("${STEP[@]}")
  PRETRAIN=(--device cuda --dtype bfloat16 --config configs/bench-moe.yaml --warmup 3 --steps 10 --sequence-parallel)
  DECODE=(--device cuda --config configs/bench-moe.yaml)
fi
SUFFIX=$([[ $MODE == cpu ]] && echo cpu_smoke || echo cuda)

step gpu_checks 180 "$PY" bench/gpu_checks.py "${CHECKS[@]}" --out "$OUT/gpu_checks_$SUFFIX.json"
step model_step 240 "$PY" bench/model_step.py "${STEP[@]}" --out "$OUT/model_step_$SUFFIX.json"
step pretrain_step 240 "$PY" bench/pretrain_step_gpu.py "${PRETRAIN[@]}" --out "$OUT/pretrain_step_$SUFFIX.json"
step serve_decode 240 "$PY" bench/serve_decode_gpu.py "${DECODE[@]}" --out "$OUT/serve_decode_$SUFFIX.json"
step model_step_compile 360 "$PY" bench/model_step.py "${COMPILE_STEP[@]}" --compile \
  --out "$OUT/model_step_${SUFFIX}_compile.json"

if [[ $MODE == gpu ]]; then  # keep a copy beside the CPU results when $OUT is elsewhere
  for f in "$OUT"/model_step_cuda*.json "$OUT"/gpu_checks_cuda.json "$OUT"/pretrain_step_cuda.json \
           "$OUT"/serve_decode_cuda.json; do
    [[ -f $f && $(dirname "$f") != bench/results ]] && cp "$f" bench/results/ 2>/dev/null
  done
fi
echo
echo "==== summary ($MODE mode), logs in $LOG"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
