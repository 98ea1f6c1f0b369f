#!/usr/bin/env bash
# Runs the benchmarks once per backend (one process each); JSON goes to benchmarks/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
for backend in jax tensorflow torch; do
  python train_throughput.py --backend "$backend" "$@"
  python bench_augment.py --backend "$backend" "$@"
done
