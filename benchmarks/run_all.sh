#!/usr/bin/env bash
# Every benchmark on every backend, one process each; JSON in benchmarks/results/,
# then one summary table. Run it on a quiet machine: on a loaded one the
# wall-clock figures measure the load (the "CPU-bound est." column less so).
# Usage: bash benchmarks/run_all.sh [--quick] [args for every benchmark]
#        PYTHON=/path/to/python BACKENDS="jax torch" bash benchmarks/run_all.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results
mkdir -p "$OUT"
status=0
run() {  # name backend script [args...]
  local name=$1 backend=$2
  shift 2
  echo "=== $name ($backend)"
  KERAS_BACKEND=$backend "$PY" "$@" --backend "$backend" --out "$OUT/$name-$backend.json" || status=1
}
for backend in ${BACKENDS:-jax tensorflow torch}; do
  run train_throughput "$backend" benchmarks/train_throughput.py "$@"
  run train_step_v2 "$backend" benchmarks/bench_train_step.py --cases v2 "$@"
  run augment "$backend" benchmarks/bench_augment.py "$@"
  run embed "$backend" benchmarks/bench_embed.py "$@"
  run pipeline "$backend" benchmarks/bench_pipeline.py "$@"
done
"$PY" benchmarks/_bench.py "$OUT"/*.json
exit $status
