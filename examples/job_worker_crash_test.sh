#!/usr/bin/env bash
# End-to-end test of examples/job_worker.cpp: a first run crashes on purpose (--crash-after, exit
# status 3, nothing flushed), a second run on the same database recovers the jobs left InProgress,
# finishes everything and verifies from the database that every job ended Completed or Failed
# exactly once. Usage: job_worker_crash_test.sh JOB_WORKER [job_worker options...]
set -uo pipefail
bin="$1"; shift
dir="$(mktemp -d /tmp/sluice-jobs-test-XXXXXX)"
trap 'rm -rf "$dir"' EXIT
db="$dir/jobs.db"

echo "---- run 1: crash after 1500 jobs started ----"
"$bin" --db "$db" --crash-after 1500 --quiet "$@"
rc=$?
if [[ $rc -ne 3 ]]; then echo "FAIL: run 1 should have crashed with status 3, got $rc"; exit 1; fi

echo "---- run 2: recover and finish ----"
out="$("$bin" --db "$db" --quiet "$@")"
rc=$?
echo "$out"
if [[ $rc -ne 0 ]]; then echo "FAIL: run 2 exited with $rc"; exit 1; fi
recovered="$(sed -n 's/.*found InProgress.*//p' <<<"$out" >/dev/null; grep -o '[0-9]* found InProgress' <<<"$out" | grep -o '^[0-9]*')"
if [[ -z "$recovered" || "$recovered" -eq 0 ]]; then echo "FAIL: run 2 found no InProgress job to recover"; exit 1; fi
grep -q "verification passed" <<<"$out" || { echo "FAIL: no 'verification passed'"; exit 1; }
echo "PASS: crash after 1500 starts, $recovered InProgress jobs recovered, every job final exactly once"
