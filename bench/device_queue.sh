#!/usr/bin/env bash
# The GPU work of one device lease as one queue that outlives the device tool's 10-minute calls. On the GPU machine,
# from the repo root (`.whl` carried, see bench/gpu_env.sh):
#
#     bash bench/device_queue.sh [SECONDS]
#
# The first call starts the queue in the background, detached from the call: each line of bench/device_queue.txt
# (or of $QUEUE) in order, `#` lines skipped, every command's output and exit status in one log. Every call then
# waits up to SECONDS (default 540) for the queue, prints what it wrote since the previous call, copies the log
# and the results files in $QUEUE_RESULTS (default /tmp/e2e.jsonl /tmp/bench.jsonl /tmp/setup-prof.txt /tmp/prof.log /tmp/bench-memory.txt) to $OUT (when set), and
# ends with "queue: running" or "queue: done". Call again before the machine's idle window
# (the device tool's idle_release_s) runs out, or the machine and the queue are gone.
set -uo pipefail
state=${QUEUE_STATE:-/tmp/tunery-queue}
queue=${QUEUE:-bench/device_queue.txt}
wait_s=${1:-540}
mkdir -p "$state"
if [ ! -f "$state/started" ]; then
  [ -f "$queue" ] || { echo "no queue file $queue" >&2; exit 2; }
  cp "$queue" "$state/queue.txt"
  : > "$state/log"
  echo 0 > "$state/offset"
  date -u +%FT%TZ > "$state/started"
  setsid bash -c '
    while IFS= read -r cmd; do
      case "$cmd" in ""|"#"*) continue ;; esac
      echo "### $(date -u +%T) start: $cmd" >> "$0/log"
      bash -c "$cmd" >> "$0/log" 2>&1
      rc=$?
      echo "### $(date -u +%T) exit $rc: $cmd" >> "$0/log"
    done < "$0/queue.txt"
    touch "$0/done"' "$state" < /dev/null > /dev/null 2>&1 &
fi
for _ in $(seq 1 "$wait_s"); do
  [ -f "$state/done" ] && break
  sleep 1
done
offset=$(cat "$state/offset")
tail -c +"$((offset + 1))" "$state/log"
stat -c %s "$state/log" > "$state/offset"
if [ -n "${OUT:-}" ]; then  # the log and the results files the queue's commands write so far
  cp "$state/log" "$OUT/queue.log"
  for f in ${QUEUE_RESULTS:-/tmp/e2e.jsonl /tmp/bench.jsonl /tmp/setup-prof.txt /tmp/prof.log /tmp/bench-memory.txt}; do [ -f "$f" ] && cp "$f" "$OUT/"; done
fi
if [ -f "$state/done" ]; then echo "queue: done"; else echo "queue: running"; fi
