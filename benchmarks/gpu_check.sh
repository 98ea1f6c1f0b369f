#!/usr/bin/env bash
# One GPU, checked end to end in a few minutes: install the project, pretrain
# through the command line on the built-in corpus on each backend that is
# installed, time the command line (cache -> fit()) and the in-memory training
# step at batch 64 and 256, and write JSON plus one summary table.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--backends "jax torch tensorflow"]
#                                [--pool AUDIO_DIR] [--quick] [--allow-cpu] [--python PY]
#
# --wheels DIR  install offline from a folder of wheels (a machine without a
#               package registry; make the folder with benchmarks/gpu_wheels.sh on
#               a machine that has one). Without it, pip installs from its index.
#               Either way the venv sees the system's packages, so the GPU builds
#               of JAX / PyTorch / TensorFlow already on the machine are used.
# --pool DIR    also run the 180-epoch recipe of docs/results.md through
#               `byola-keras pretrain` on that audio folder (v1, d=512, batch 128,
#               seed 0) and keep its encoder for the linear evaluation.
# --python PY   use this Python environment as it is (no venv, no install).
# --quick       smoke test: tiny sizes (with --allow-cpu it runs on a CPU-only machine).
# Results: OUT (default benchmarks/results/gpu-DATE) holds gpu.txt, *.json, logs
# and summary.md.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
WHEELS="" OUT="" POOL="" QUICK=0 ALLOW_CPU=0 PY=""
BACKENDS="jax torch tensorflow"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$(cd "$2" && pwd); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --backends) BACKENDS=$2; shift 2 ;;
    --pool) POOL=$(cd "$2" && pwd); shift 2 ;;
    --quick) QUICK=1; shift ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    --python) PY=$(command -v "$2"); shift 2 ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
started=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }

# 0. The machine.
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
elif [ "$ALLOW_CPU" = 1 ]; then
  echo "no GPU (--allow-cpu)" | tee "$OUT/gpu.txt"
else
  echo "error: nvidia-smi not found: this check is for a GPU machine (--allow-cpu to run it anyway)" >&2
  exit 2
fi
{ lscpu | grep -E "^(Model name|CPU\(s\)|Flags)"; python3 --version; } > "$OUT/machine.txt" 2>&1

# 1. Install: a venv on top of the system's packages, the project editable.
if [ -z "$PY" ]; then
  VENV="$OUT/venv"
  python3 -m venv --system-site-packages "$VENV" || exit 1
  PY="$VENV/bin/python"
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation -e . >"$OUT/install.log" 2>&1
  else
    "$PY" -m pip install -q -e . >"$OUT/install.log" 2>&1
  fi || { echo "error: installing the project failed; see $OUT/install.log" >&2; tail -5 "$OUT/install.log" >&2; exit 1; }
fi
CLI=("$PY" -m byola_keras.cli)
say "installed: $("$PY" -c 'import importlib.metadata as m; print("keras", m.version("keras"))')"

if [ "$QUICK" = 1 ]; then
  CLI_ARGS=(--quick --dim 512) STEP_ARGS=(--quick) BATCHES=(8) CASES=(v1-512) PRETRAIN=(--epochs 1 --batch-size 8 --dim 64 --steps-per-epoch 2)
else
  CLI_ARGS=(--batch 256 --dim 512 --steps-per-epoch 100 --repeats 1) STEP_ARGS=(--steps 30 --warmup 5)
  BATCHES=(64 256) CASES=(v1-512 v1-2048) PRETRAIN=(--epochs 3 --batch-size 64 --dim 512)
fi

# 2. Per backend: the README's pretraining command, the training step in memory,
#    the command line's rate against it.
for backend in $BACKENDS; do
  module=$backend
  if ! "$PY" -c "import $module" >/dev/null 2>&1; then
    say "$backend: not installed on this machine, skipped"
    echo "{\"backend\": \"$backend\", \"skipped\": \"not installed\"}" > "$OUT/skipped-$backend.json"
    continue
  fi
  say "$backend: byola-keras pretrain on the built-in corpus"
  "${CLI[@]}" pretrain --backend "$backend" "${PRETRAIN[@]}" --out "$OUT/pretrain-$backend" \
    >"$OUT/pretrain-$backend.log" 2>&1 \
    && say "$backend: pretrain OK: $(grep -E '^Trained to epoch' "$OUT/pretrain-$backend.log")" \
    || { say "$backend: pretrain FAILED (exit $?), see $OUT/pretrain-$backend.log"; tail -3 "$OUT/pretrain-$backend.log"; }
  say "$backend: training step in memory, batch ${BATCHES[*]}"
  "$PY" benchmarks/bench_train_step.py --backend "$backend" --cases "${CASES[@]}" --batch "${BATCHES[@]}" \
    "${STEP_ARGS[@]}" --out "$OUT/train_step-$backend.json" >"$OUT/train_step-$backend.log" 2>&1 \
    || say "$backend: bench_train_step FAILED, see $OUT/train_step-$backend.log"
  say "$backend: command line rate"
  "$PY" benchmarks/bench_cli.py --backend "$backend" "${CLI_ARGS[@]}" --in-memory "$OUT/train_step-$backend.json" \
    --work "$OUT/cli-$backend" --out "$OUT/cli-$backend.json" >"$OUT/cli-$backend.log" 2>&1 \
    || say "$backend: bench_cli FAILED, see $OUT/cli-$backend.log"
  rm -rf "$OUT/cli-$backend"  # checkpoints of the timing runs
done

# 3. The 180-epoch recipe of docs/results.md through the command line.
if [ -n "$POOL" ]; then
  say "recipe: 180 epochs, v1 d=512 batch 128 on $POOL (JAX)"
  "${CLI[@]}" pretrain "$POOL" --backend jax --epochs 180 --batch-size 128 --dim 512 --seed 0 \
    --out "$OUT/recipe" >"$OUT/recipe.log" 2>&1 \
    && say "recipe: $(grep -E '^Trained to epoch' "$OUT/recipe.log"); encoder $OUT/recipe/encoder.keras" \
    || say "recipe FAILED, see $OUT/recipe.log"
  rm -f "$OUT"/recipe/checkpoint-*.npz
fi

# 4. One table.
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import glob, json, os, sys
out = sys.argv[1]
print(f"GPU: {open(os.path.join(out, 'gpu.txt')).read().strip()}")
print("\n| backend | case | batch | in-memory samples/s | command line samples/s | share |\n|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "train_step-*.json"))):
    record = json.load(open(path))
    cli_path = os.path.join(out, f"cli-{record['backend']}.json")
    cli = json.load(open(cli_path))["results"][0] if os.path.exists(cli_path) else {}
    for row in record["results"]:
        same = cli.get("case") == row["case"] and cli.get("batch") == row["batch"]
        print(f"| {record['backend']} | {row['case']} | {row['batch']} | {row['samples_per_s_median']} | "
              f"{cli.get('samples_per_s_median', '-') if same else '-'} | "
              f"{cli.get('share_of_in_memory', '-') if same else '-'} |")
EOF
say "done: $OUT"
