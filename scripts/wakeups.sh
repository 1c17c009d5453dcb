#!/usr/bin/env bash
# Counts the goroutines parked (and so woken again) per HTTP request on the kernel -> agent ->
# kernel path: BenchmarkHTTPRequestAgentUDS/serial (one request at a time, as at a low rate, so
# that nothing batches) is traced at two lengths, the Running->Waiting transitions of each trace
# are grouped by the first frame of their stack outside the runtime and the standard library,
# and the difference between the two traces is divided by the difference in requests. Also
# prints the yields (Running->Runnable). See docs/performance.md, Wake-ups.
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${BENCH:-HTTPRequestAgentUDS/serial\$}"
short="${SHORT:-2000}"
long="${LONG:-6000}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
count() {
  go tool trace -d=parsed "$1" 2>/dev/null | awk '
    /StateTransition/ && /GoID=/ && /Running->(Waiting|Runnable)/ {
      kind = ($0 ~ /Running->Waiting/) ? "park" : "yield"; want = 1; top = "?"; next
    }
    want && /^TransitionStack=/ { instack = 1; next }
    want && instack && /^\t\t/ { next }
    want && instack && /^\t/ {
      f = $1
      if (top == "?" && f !~ /^(runtime|internal|sync|time|syscall|os|net|context)[.\/]/) top = f
      next
    }
    want && instack { n[kind " " top]++; want = 0; instack = 0 }
    want && !instack && !/^TransitionStack=/ { n[kind " " top]++; want = 0 }
    END { for (k in n) print k, n[k] }'
}
for n in "$short" "$long"; do
  go test -tags vtprotobuf -run '^$' -bench "$bench" -benchtime "${n}x" -trace "$dir/$n.trace" ./kernel/ >/dev/null
  count "$dir/$n.trace" | sort > "$dir/$n.txt"
done
join -a2 -e 0 -o 0,1.2,2.2 <(awk '{print $1"|"$2, $3}' "$dir/$short.txt" | sort) <(awk '{print $1"|"$2, $3}' "$dir/$long.txt" | sort) |
  awk -v d="$((long - short))" '{ v = ($3 - $2) / d; if (v >= 0.05 || v <= -0.05) { split($1, k, "|"); printf "%6.2f %-5s %s\n", v, k[1], k[2] } }' |
  sort -k2,2 -k1,1nr
