#!/usr/bin/env bash
# Start (idempotently) the services the test suite talks to. Later issues add SLURM, Ray and MLflow here.
set -euo pipefail
cmd="${1:-start}"
case "$cmd" in
  start)
    echo "services: none needed yet"
    ;;
  *) echo "usage: $0 start" >&2; exit 2 ;;
esac
