#!/usr/bin/env bash
# Captures CPU and heap profiles of the kernel and the agent from their pprof endpoints while
# `make loadtest` traffic runs against them (each open-loop rate, then the closed loop) and
# while 10,000 streams are held open, into profiles/, and the steps of the agent calls at each
# open-loop rate (open<rate>.crossing.txt, from execution traces of both processes). Read them
# with `go tool pprof -top bin/policy-kernel profiles/kernel.cpu.pprof` (see profiles/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${PROFILE_DIR:-profiles}"
mkdir -p "$out"
go run ./loadtest/cmd/loadtest -targets kernel+agent -open 8s -closed 20s \
  -profile "$out" -profile-seconds 15s -json "$out/loadtest.json" "$@"
# Where the agent calls' time goes, from the execution traces of each open-loop rate (the
# traces themselves are large and not kept in the repository).
for k in "$out"/open*.kernel.trace; do
  [ -e "$k" ] || continue
  go run ./loadtest/cmd/crossing "$k" "${k%.kernel.trace}.agent.trace" > "${k%.kernel.trace}.crossing.txt"
done
echo "profiles written to $out/" >&2
