#!/usr/bin/env bash
# The device check (issue 16): on ONE GPU, from a ~1B-parameter Llama-architecture model built locally
# from a config (no hub; fp32 safetensors that bf16 cannot hold + a locally built tokenizer), `ssapo train`
# runs a seed stage and one round through each engine, each as the user's command would:
#   ddp        --accelerate-config ddp, one process: a launch (torchrun), engine MULTI_GPU
#   zero3      --accelerate-config zero3, one process: DeepSpeed ZeRO-3 (zero.Init, the engine, fp32 masters)
#   fsdp       --accelerate-config fsdp, one process: FSDP (sharded checkpoints, the full model at the end)
#   precision  zero3 in bf16 at lr 1e-30: every stage's saved weights must equal the fp32 start bit for bit
#   lora       LoRA + gradient checkpointing under zero3, killed (SIGKILL) after the seed stage's first
#              checkpoint and resumed with --resume: must resume from that checkpoint and finish
#   qlora      a 4-bit base + LoRA, one process (bitsandbytes: installed here when it can be), seed stage only
#   vllm       annotation by vLLM through the driver's launcher (a one-process ddp launch); the free GPU
#              memory before the engine and after its release (at least 95 % back), generation and scoring s
# A run FAILS unless it exits 0, every stage reports the engine it claims (metrics.json leader.engine, what
# accelerate set up), and its own check holds. Per step (metrics.json "steps", each step measures itself):
# wall seconds, peak GPU memory of each process (torch's allocator), peak GPU memory used (nvidia-smi,
# sampled), peak host memory, generation and training tokens/s. Everything within BUDGET_S (570 s on a GPU).
#
#   bash benches/gpu_check.sh [--dry-run] [--only ddp,zero3,...] [WORK_DIR]
#
# --dry-run: no GPU needed: a tiny model (hidden 64) and the same commands on the CPU where an engine runs
# there: ddp in-process (engine NO), zero3 and lora through recipes/accelerate/zero3_cpu.yaml (DeepSpeed
# ZeRO-3 on CPU processes), precision on 2 CPU processes in bf16; fsdp, qlora and vllm are skipped with the
# reason (accelerate does not launch FSDP without a GPU; bitsandbytes and vLLM need one).
# Output: WORK_DIR/gpu_check.md (+ report_*.json, logs/). Exit 1 when any run failed.
# Python: $PYTHON (default python3) with ssapo importable (pip install .), or this checkout with
# python/dro_core/_dro_core*.so built (then PYTHONPATH=python is set here).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
ONLY="ddp,zero3,fsdp,precision,lora,qlora,vllm"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--tiny) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) WORK="$1" ;;
  esac
  shift
done
WORK="${WORK:-/tmp/ssapo_gpu_check}"
BUDGET_S="${BUDGET_S:-$( [ "$DRY" = 1 ] && echo 2400 || echo 570 )}"  # the CPU dry run: 2 cores, minutes a run
T_START=$(date +%s)
rm -rf "$WORK/runs" "$WORK"/report_*.json "$WORK"/skipped_*.txt
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
wanted() { case ",$ONLY," in *,"$1",*) return 0 ;; esac; return 1; }
skip() { echo "$2" > "$WORK/skipped_$1.txt"; echo "gpu_check: $1 skipped: $2" >&2; }

if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  SIZE=(--tiny); PAIRS=96
  COMMON=(--seed-size 32 --round-sizes 32 --num-rounds 1 --batch-size 8 --per-device-train-batch-size 4
          --max-length 192 --max-prompt-length 96 --max-new-tokens 16 --generation-batch-size 16)
  CPU=(--use-cpu true --bf16 false)           # in-process on the CPU
  ENGINE_CPU=(--use-cpu false --bf16 false)   # DeepSpeed on CPU processes (use_cpu would switch it off)
  ZERO3=zero3_cpu
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no GPU visible (torch.cuda.is_available() is False); use --dry-run on a CPU" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
  SIZE=(); PAIRS=160
  # 32 seed pairs (4 optimizer steps of 8), one round of 32 prompts × 2 samples of up to 96 new tokens
  COMMON=(--seed-size 32 --round-sizes 32 --num-rounds 1 --batch-size 8 --per-device-train-batch-size 4
          --max-length 384 --max-prompt-length 128 --max-new-tokens 96 --generation-batch-size 32
          --precompute-ref-batch-size 8)
  CPU=(--use-cpu false --bf16 true)
  ENGINE_CPU=(--use-cpu false --bf16 true)
  ZERO3=zero3
fi
COMMON+=(--seed-epochs 1 --learning-rate 1e-6 --seed-learning-rate 1e-6 --num-samples 2 --temperature 0.7
         --eps 0.01 --group-size 100 --report-to none --logging-steps 1 --method ssapo
         --generation-backend transformers)

# the precision probe: learning rates too small to move any fp32 weight; the policy then never moves, so the
# implicit reward ties every response: responses are ranked by length instead (gpu_check.by_length)
PROBE=(--learning-rate 1e-30 --seed-learning-rate 1e-30 --annotator gpu_check:by_length)
export PYTHONPATH="$REPO/benches${PYTHONPATH:+:$PYTHONPATH}"

echo "== build ($( [ "$DRY" = 1 ] && echo tiny || echo ~1B )) -> $WORK" >&2
"$PY" "$REPO/benches/gpu_check.py" build --out "$WORK" "${SIZE[@]}" --pairs "$PAIRS" > "$WORK/logs/build.log" 2>&1 \
  || { cat "$WORK/logs/build.log" >&2; exit 1; }
tail -n 20 "$WORK/logs/build.log" >&2
MODEL="$WORK/model"
DATA="$WORK/pairs.jsonl"

# run LABEL ENGINE CHECK [flags...]: one `ssapo train` (ENGINE: what every stage must report; CHECK: none,
# precision, vllm, resume); with CHECK=resume the run is killed after the seed stage's first complete
# checkpoint and continued with --resume
run() {
  local label="$1" engine="$2" check="$3"; shift 3
  local run="$WORK/runs/$label" samples="$WORK/samples_$label.csv" stop="$WORK/.stop_$label"
  local budget; budget=$(left)
  if [ "$budget" -lt 60 ]; then skip "$label" "only ${budget}s of the ${BUDGET_S}s budget left"; return 0; fi
  rm -rf "$run" "$stop"; mkdir -p "$(dirname "$run")"
  "$PY" "$REPO/benches/gpu_check.py" monitor --run-dir "$run" --out "$samples" --stop "$stop" &
  local mon=$!
  local t0; t0=$(date +%s.%N)
  local cmd=("$PY" -m ssapo.cli train --model "$MODEL" --preference-data "$DATA" --output-dir "$run"
             "${COMMON[@]}" "$@")
  local rc
  echo "== $label: ${cmd[*]:3} (timeout $((budget - 20)) s)" >&2
  if [ "$check" = resume ]; then
    setsid timeout --signal=TERM --kill-after=15 $((budget - 20)) "${cmd[@]}" > "$WORK/logs/$label.log" 2>&1 &
    local pid=$! waited=0
    until ls "$run"/seed/trainer/checkpoint-*/ssapo_checkpoint.json >/dev/null 2>&1; do
      sleep 0.5; waited=$((waited + 1))
      if ! kill -0 "$pid" 2>/dev/null || [ "$waited" -gt $((2 * (budget - 40))) ]; then break; fi
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "== $label: checkpoint written; SIGKILL to the run's processes, then --resume" >&2
      kill -KILL -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
      timeout --signal=TERM --kill-after=15 $(($(left) - 20)) "${cmd[@]}" --resume >> "$WORK/logs/$label.log" 2>&1
      rc=$?
    else
      wait "$pid"; rc=$?; echo "== $label: the run ended before it could be killed (exit $rc)" >&2
    fi
  else
    timeout --signal=TERM --kill-after=15 $((budget - 20)) "${cmd[@]}" > "$WORK/logs/$label.log" 2>&1
    rc=$?
  fi
  local wall; wall=$("$PY" -c "import time; print(round(time.time() - $t0, 1))")
  touch "$stop"; wait "$mon" 2>/dev/null
  echo "== $label: exit $rc after ${wall}s (log: $WORK/logs/$label.log)" >&2
  [ "$rc" = 0 ] || tail -n 30 "$WORK/logs/$label.log" >&2
  "$PY" "$REPO/benches/gpu_check.py" report --work "$WORK" --run-dir "$run" --label "$label" --samples "$samples" \
      --json "$WORK/report_$label.json" --wall "$wall" --rc "$rc" --expect-engine "$engine" --check "$check" >&2 \
      || echo "gpu_check: report of $label failed" >&2
}

if [ "$DRY" = 1 ]; then
  wanted ddp && run ddp "NO" none "${CPU[@]}"
  wanted zero3 && run zero3 "DEEPSPEED zero-3" none "${ENGINE_CPU[@]}" --accelerate-config zero3_cpu --num-processes 1
  wanted fsdp && skip fsdp "accelerate does not launch FSDP without a GPU"
  wanted precision && run precision "DEEPSPEED zero-3" precision --use-cpu false --bf16 true \
      --accelerate-config zero3_cpu --num-processes 2 "${PROBE[@]}"
  wanted lora && run lora "DEEPSPEED zero-3" resume "${ENGINE_CPU[@]}" --accelerate-config zero3_cpu \
      --num-processes 1 --use-peft --gradient-checkpointing --save-steps 1 --seed-epochs 2
  wanted qlora && skip qlora "bitsandbytes' 4-bit layers need a GPU"
  wanted vllm && skip vllm "vLLM needs a GPU"
else
  wanted ddp && run ddp "MULTI_GPU" none "${CPU[@]}" --accelerate-config ddp --num-processes 1
  wanted zero3 && run zero3 "DEEPSPEED zero-3" none "${CPU[@]}" --accelerate-config zero3 --num-processes 1
  wanted fsdp && run fsdp "FSDP" none "${CPU[@]}" --accelerate-config fsdp --num-processes 1 --save-steps 2
  wanted precision && run precision "DEEPSPEED zero-3" precision "${CPU[@]}" --accelerate-config zero3 \
      --num-processes 1 "${PROBE[@]}"
  wanted lora && run lora "DEEPSPEED zero-3" resume "${CPU[@]}" --accelerate-config zero3 --num-processes 1 \
      --use-peft --gradient-checkpointing --save-steps 1 --seed-epochs 2
  if wanted qlora; then
    if "$PY" -c "import bitsandbytes" 2>/dev/null || "$PY" -m pip install -q bitsandbytes > "$WORK/logs/bnb.log" 2>&1; then
      run qlora "NO" none "${CPU[@]}" --use-peft --load-in-4bit --method dpo --num-processes 1
    else
      skip qlora "bitsandbytes is not installed and pip could not install it (no network?): $WORK/logs/bnb.log"
    fi
  fi
  if wanted vllm; then
    if "$PY" -c "import vllm" 2>/dev/null; then
      run vllm "MULTI_GPU" vllm "${CPU[@]}" --accelerate-config ddp --num-processes 1 --generation-backend vllm
    else
      skip vllm "vllm does not import here (pip install '.[vllm]')"
    fi
  fi
fi
"$PY" "$REPO/benches/gpu_check.py" summary --work "$WORK" > /dev/null
rc=$?
echo "== gpu_check: $(( $(date +%s) - T_START )) s in all; $WORK/gpu_check.md" >&2
cat "$WORK/gpu_check.md"
exit $rc
