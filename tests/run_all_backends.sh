#!/usr/bin/env bash
# The test command: the whole suite once per Keras backend, each in its own process.
# Usage: bash tests/run_all_backends.sh [pytest args...]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
for backend in tensorflow jax torch; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider --durations=5 "$@" || status=1
done
exit $status
