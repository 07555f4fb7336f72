#!/usr/bin/env bash
# Sample a running process's kernel-side costs every 30 s, for BENCHMARKS.md "Memory allocator".
#   benchmarks/procstat.sh 'benchmarks/accuracy.py' > runs/logs/procstat.log &     # pgrep -f pattern
# Each line: epoch seconds, pid, then /proc/PID/stat's minflt majflt utime stime (clock ticks),
# the machine's steal ticks and the process's resident KiB. Rates between two lines, e.g. over
# one pid's lines up to time END (training only):
#   awk -v end=END '$2==PID && $1<=END' LOG | awk 'NR==1{t0=$1;f0=$4;u0=$6;s0=$7} {t=$1;f=$4;u=$6;s=$7}
#     END{printf "minflt/s %.0f kernel share %.1f%%\n", (f-f0)/(t-t0), 100*(s-s0)/((u-u0)+(s-s0))}'
pattern=${1:?usage: procstat.sh PGREP_PATTERN}
while true; do
  pid=$(pgrep -f "$pattern" | head -1)
  if [ -n "$pid" ]; then
    s=$(awk '{print $10, $12, $14, $15}' /proc/$pid/stat 2>/dev/null)
    st=$(awk '/^cpu /{print $9}' /proc/stat)
    rss=$(awk '/VmRSS/{print $2}' /proc/$pid/status 2>/dev/null)
    echo "$(date +%s) $pid minflt_majflt_utime_stime: $s steal $st rss_kb $rss"
  fi
  sleep 30
done
