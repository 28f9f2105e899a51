#!/usr/bin/env bash
# Stage the records of every finished run of the sweeps under benchmarks/sweeps (an unfinished
# run's records without its checkpoint could not be resumed, so they are left out) and the
# sweep-level files. Usage: benchmarks/sweeps/commit_finished.sh && git commit -m "..."
set -euo pipefail
cd "$(dirname "$0")"
for sweep in */; do
  [ -f "${sweep}sweep.json" ] || continue  # a single run kept beside the sweeps (e.g. a teacher)
  git add "${sweep}sweep.json"
  for f in table.md table.csv runs.csv; do [ -f "${sweep}$f" ] && git add "${sweep}$f"; done
  for run in "${sweep}"*/; do
    [ -f "${run}sweep-run.json" ] || continue
    if python3 - "$run" <<'PY'
import json, sys
status = json.load(open(sys.argv[1] + "sweep-run.json")).get("status")
sys.exit(0 if status in ("completed", "max_steps") else 1)
PY
    then git add "${run}config.yaml" "${run}metrics.jsonl" "${run}metrics.csv" "${run}sweep-run.json"; fi
  done
done
