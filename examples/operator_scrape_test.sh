#!/usr/bin/env bash
# End-to-end test of examples/operator.cpp's --metrics-port: runs the operator, scrapes
# http://127.0.0.1:PORT/metrics with curl while it runs, and checks in every scrape that the
# client-go / controller-runtime metric names are present and that the counters balance:
#   workqueue_adds_total == sum(sluice_outcomes_total) + sum(sluice_pending)
#   sum(controller_runtime_reconcile_total) == workqueue_work_duration_seconds_count
#   controller_runtime_reconcile_errors_total == controller_runtime_reconcile_total{result="error"}
# Usage: operator_scrape_test.sh OPERATOR [operator options...]
set -uo pipefail
bin="$1"; shift
check_py='
import re, sys
text = sys.stdin.read()
need = ["workqueue_depth", "workqueue_adds_total", "workqueue_queue_duration_seconds_bucket",
        "workqueue_work_duration_seconds_bucket", "workqueue_unfinished_work_seconds",
        "workqueue_longest_running_processor_seconds", "workqueue_retries_total",
        "controller_runtime_reconcile_total", "controller_runtime_reconcile_errors_total",
        "controller_runtime_reconcile_time_seconds_bucket", "controller_runtime_active_workers",
        "controller_runtime_max_concurrent_reconciles"]
vals = {}
for line in text.splitlines():
    if not line or line.startswith("#"): continue
    name, value = line.rsplit(" ", 1)
    vals[name] = float(value)
names = {re.sub(r"\{.*", "", k) for k in vals}
missing = [n for n in need if n not in names]
if missing: print("missing metrics:", missing); sys.exit(1)
def total(prefix): return sum(v for k, v in vals.items() if k.startswith(prefix + "{"))
adds = total("workqueue_adds_total")
accounted = total("sluice_outcomes_total") + total("sluice_pending")
runs = total("controller_runtime_reconcile_total")
work = total("workqueue_work_duration_seconds_count")
errors = total("controller_runtime_reconcile_errors_total")
err_label = sum(v for k, v in vals.items() if k.startswith("controller_runtime_reconcile_total") and "result=\"error\"" in k)
if adds != accounted: print("unbalanced: adds", adds, "!= outcomes+pending", accounted); sys.exit(1)
if runs != work: print("unbalanced: reconcile_total", runs, "!= work_duration count", work); sys.exit(1)
if errors != err_label: print("unbalanced: errors_total", errors, "!= result=error", err_label); sys.exit(1)
print("adds %d runs %d pending %d" % (adds, runs, total("sluice_pending")))
'
for attempt in 1 2 3; do
  port=$(( 20000 + (RANDOM % 20000) ))
  log="$(mktemp)"
  "$bin" --metrics-port "$port" --hold-ms 1500 --quiet "$@" >"$log" 2>&1 &
  pid=$!
  scrapes=0; mid_run=0; bad=0
  while kill -0 "$pid" 2>/dev/null; do
    if body="$(curl -sf --max-time 2 "http://127.0.0.1:$port/metrics")"; then
      if summary="$(python3 -c "$check_py" <<<"$body")"; then
        scrapes=$((scrapes + 1))
        pending="$(awk '{print $6}' <<<"$summary")"
        [[ "$pending" != "0" ]] && mid_run=$((mid_run + 1))
      else
        echo "scrape check failed: $summary"; bad=1
      fi
    fi
    sleep 0.05
  done
  wait "$pid"; rc=$?
  if grep -q "bind\|Address already in use" "$log" && [[ $scrapes -eq 0 ]]; then rm -f "$log"; continue; fi
  tail -n 25 "$log"; rm -f "$log"
  echo "scrapes: $scrapes ok ($mid_run while work was pending), operator exit status $rc"
  if [[ $bad -ne 0 || $rc -ne 0 || $scrapes -lt 3 || $mid_run -lt 1 ]]; then echo "FAIL"; exit 1; fi
  echo "PASS"; exit 0
done
echo "FAIL: could not bind a metrics port"; exit 1
