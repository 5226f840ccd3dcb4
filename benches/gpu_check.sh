#!/usr/bin/env bash
# The device check of issue 9: on ONE GPU, from a ~1B-parameter Llama-architecture model built
# locally from a config (no hub; safetensors + a locally built tokenizer), `ssapo train` runs a
# seed stage and one round in bf16
#   1. ddp    — one process, no engine (plain data parallel with one rank)
#   2. zero3  — DeepSpeed ZeRO-3 (recipes/accelerate/zero3.yaml), one process
#   3. vllm   — as 1 with vLLM annotation, when vllm imports
# and reports per step: wall time, generation tokens/s, peak GPU memory, and whether the
# checkpoints' weights moved from the start model (benches/gpu_check.py report).
# Everything is capped to finish in under 10 minutes (BUDGET_S, default 570 s).
#
#   bash benches/gpu_check.sh [--dry-run] [--only ddp,zero3,vllm] [WORK_DIR]
#
# --dry-run: no GPU needed: a tiny model (hidden 64) and the same data, and the same
# `ssapo train` command on the CPU (use_cpu, fp32) for the ddp run only: checks the model and
# data building, the CLI flags and the report. Output: WORK_DIR/gpu_check.md (+ report_*.json,
# logs/). Python: $PYTHON (default python3) with ssapo importable (pip install .), or this
# checkout with python/dro_core/_dro_core*.so built (then PYTHONPATH=python is set here).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
ONLY="ddp,zero3,vllm"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--tiny) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) WORK="$1" ;;
  esac
  shift
done
WORK="${WORK:-/tmp/ssapo_gpu_check}"
BUDGET_S="${BUDGET_S:-570}"
T_START=$(date +%s)
mkdir -p "$WORK/logs"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import ssapo.cli, dro_core" 2>/dev/null; then
  export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import ssapo.cli, dro_core, torch, transformers, trl, accelerate, datasets" ; then
  echo "gpu_check: ssapo or a dependency does not import (pip install . first)" >&2
  exit 2
fi

left() { echo $(( BUDGET_S - ($(date +%s) - T_START) )); }

if [ "$DRY" = 1 ]; then
  SIZE=(--tiny); PAIRS=96
  COMMON=(--use-cpu true --bf16 false --seed-size 32 --round-sizes 32 --num-rounds 1 --batch-size 8
          --per-device-train-batch-size 4 --max-length 192 --max-prompt-length 96 --max-new-tokens 16
          --generation-batch-size 16)
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no GPU visible (torch.cuda.is_available() is False); use --dry-run on a CPU" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
  SIZE=(); PAIRS=192
  # 64 seed pairs (8 optimizer steps of 8), one round of 64 prompts × 2 samples of 128 new tokens
  COMMON=(--use-cpu false --bf16 true --seed-size 64 --round-sizes 64 --num-rounds 1 --batch-size 8
          --per-device-train-batch-size 4 --max-length 512 --max-prompt-length 160 --max-new-tokens 128
          --generation-batch-size 64)
fi
# the paper's Llama learning rate: a bf16-only update would leave the weights (nearly) unmoved
COMMON+=(--seed-epochs 1 --learning-rate 1e-6 --seed-learning-rate 1e-6 --num-samples 2 --temperature 0.7
         --eps 0.01 --group-size 100 --report-to none --logging-steps 1 --method ssapo)

echo "== build ($( [ "$DRY" = 1 ] && echo tiny || echo ~1B )) -> $WORK" >&2
"$PY" "$REPO/benches/gpu_check.py" build --out "$WORK" "${SIZE[@]}" --pairs "$PAIRS" > "$WORK/logs/build.log" 2>&1 \
  || { cat "$WORK/logs/build.log" >&2; exit 1; }
tail -n 20 "$WORK/logs/build.log" >&2
MODEL="$WORK/model"
DATA="$WORK/pairs.jsonl"
rm -f "$WORK"/report_*.json

run_one() {  # label, extra ssapo train flags...
  local label="$1"; shift
  local run="$WORK/runs/$label" samples="$WORK/samples_$label.csv" stop="$WORK/.stop_$label"
  local budget; budget=$(left)
  if [ "$budget" -lt 60 ]; then echo "gpu_check: $label skipped, ${budget}s of the budget left" >&2; return 0; fi
  rm -rf "$run" "$stop"; mkdir -p "$(dirname "$run")"
  "$PY" "$REPO/benches/gpu_check.py" monitor --run-dir "$run" --out "$samples" --stop "$stop" &
  local mon=$!
  local t0; t0=$(date +%s.%N)
  echo "== $label: ssapo train ... (timeout $((budget - 20)) s)" >&2
  timeout --signal=TERM --kill-after=15 $((budget - 20)) "$PY" -m ssapo.cli train --model "$MODEL" \
      --preference-data "$DATA" --output-dir "$run" "${COMMON[@]}" "$@" > "$WORK/logs/$label.log" 2>&1
  local rc=$?
  local wall; wall=$("$PY" -c "import time; print(round(time.time() - $t0, 1))")
  touch "$stop"; wait "$mon" 2>/dev/null
  echo "== $label: exit $rc after ${wall}s (log: $WORK/logs/$label.log)" >&2
  [ "$rc" = 0 ] || tail -n 30 "$WORK/logs/$label.log" >&2
  "$PY" "$REPO/benches/gpu_check.py" report --work "$WORK" --run-dir "$run" --label "$label" --samples "$samples" \
      --json "$WORK/report_$label.json" --wall "$wall" --rc "$rc" >&2 || echo "gpu_check: report of $label failed" >&2
}

case ",$ONLY," in *,ddp,*) run_one ddp --generation-backend transformers ;; esac
if [ "$DRY" = 0 ]; then
  case ",$ONLY," in *,zero3,*)
    # one process under ZeRO-3: `--accelerate-config zero3` with --num-processes 1 (the driver must launch the
    # seed and leader steps under the recipe even for one process; the report says which engine ran)
    run_one zero3 --generation-backend transformers --accelerate-config zero3 --num-processes 1 ;;
  esac
  case ",$ONLY," in *,vllm,*)
    if "$PY" -c "import vllm" 2>/dev/null; then
      run_one vllm --generation-backend vllm
    else
      echo "gpu_check: vllm does not import here: the vllm run is skipped" | tee "$WORK/vllm_skipped.txt" >&2
    fi ;;
  esac
fi
"$PY" "$REPO/benches/gpu_check.py" summary --work "$WORK" > /dev/null
echo "== gpu_check: $(( $(date +%s) - T_START )) s in all; $WORK/gpu_check.md" >&2
cat "$WORK/gpu_check.md"
[ -f "$WORK/vllm_skipped.txt" ] && cat "$WORK/vllm_skipped.txt"
# exit 1 when any run failed
! grep -q '"rc": [1-9]' "$WORK"/report_*.json 2>/dev/null
