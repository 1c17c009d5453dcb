#!/usr/bin/env bash
# Drives an ext_proc server's Process method with ghz: one stream per call carrying the load
# test's request headers and response headers (process.json). The target defaults to the
# kernel of `make run`; point it at bin/extproc-noop for the baseline. Extra arguments replace
# the default load (--connections 2 -c 50 -n 20000), e.g.
# `loadtest/ghz/run.sh 127.0.0.1:9001 --connections 2 -c 100 -z 30s`.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${1:-127.0.0.1:9001}"
shift || true
if ! command -v ghz >/dev/null; then
  echo "ghz not found: go install github.com/bojand/ghz/cmd/ghz@v0.120.0" >&2
  exit 1
fi
mkdir -p bin
load=(--connections 2 -c 50 -n 20000)
if [ "$#" -gt 0 ]; then
  load=("$@")
fi
go run ./loadtest/cmd/ghzdata -protoset bin/extproc.protoset
exec ghz --insecure \
  --protoset bin/extproc.protoset \
  --call envoy.service.ext_proc.v3.ExternalProcessor.Process \
  --data-file loadtest/ghz/process.json \
  "${load[@]}" "$target"
