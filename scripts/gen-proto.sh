#!/usr/bin/env bash
# Regenerates the Go code of api/agent/v1 with pinned generator versions.
# protoc comes from Debian's protobuf-compiler package; the Go plugins are installed at the
# versions below into a folder of the repository's build output.
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.0
# The version go-control-plane generates its own fast marshalling code with.
PROTOC_GEN_GO_VTPROTO_VERSION=v0.6.1-0.20240319094008-0393e58bdf10
bindir="$PWD/bin/tools"
mkdir -p "$bindir"
if ! command -v protoc >/dev/null; then
  echo "protoc not found: install Debian's protobuf-compiler package" >&2
  exit 1
fi
GOBIN="$bindir" go install "google.golang.org/protobuf/cmd/protoc-gen-go@${PROTOC_GEN_GO_VERSION}"
GOBIN="$bindir" go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@${PROTOC_GEN_GO_GRPC_VERSION}"
GOBIN="$bindir" go install "github.com/planetscale/vtprotobuf/cmd/protoc-gen-go-vtproto@${PROTOC_GEN_GO_VTPROTO_VERSION}"
PATH="$bindir:$PATH" protoc -I . \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  --go-vtproto_out=. --go-vtproto_opt=paths=source_relative,features=marshal+unmarshal+unmarshal_unsafe+size \
  api/agent/v1/agent.proto
