#!/usr/bin/env bash
# Captures CPU and heap profiles of the kernel and the agent from their pprof endpoints while
# `make loadtest` traffic runs against them (each open-loop rate, then the closed loop) and
# while 10,000 streams are held open, into
# profiles/. Read them with
# `go tool pprof -top bin/policy-kernel profiles/kernel.cpu.pprof` (see profiles/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${PROFILE_DIR:-profiles}"
mkdir -p "$out"
go run ./loadtest/cmd/loadtest -targets kernel+agent -open 8s -closed 20s \
  -profile "$out" -profile-seconds 15s -json "$out/loadtest.json" "$@"
echo "profiles written to $out/" >&2
