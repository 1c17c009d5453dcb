#!/usr/bin/env bash
# make image-test: builds the container image from the Dockerfile with Podman, runs it, and
# tests it from outside (e2e/image, IMAGE_TEST=1). Not part of make test: it needs root (to
# install Podman and run containers) and takes minutes (docs/operations.md, "The image, built
# and run").
#
# Without BUILDER_IMAGE and RUNTIME_IMAGE it pulls nothing from a registry: the runtime base is
# Debian trixie made from Debian's packages (mmdebstrap, minbase, trimmed as debian:trixie-slim
# is), and the builder is that base plus the Go toolchain that runs this script. Set both (e.g.
# golang:1.26-trixie and debian:trixie-slim, the Dockerfile's defaults) to build from registry
# images instead.
#
# Environment: IMAGE (the tag built and tested), ENGINE_RUNTIME (the OCI runtime, runc: crun
# refuses hosts with a hybrid cgroup layout), IMAGE_TEST_TIMEOUT (seconds for the whole run,
# default 1200).
# It removes the containers it started; the images stay cached for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/policy-engine:image-test}
ENGINE_RUNTIME=${ENGINE_RUNTIME:-runc}
SUITE=trixie
BASE=localhost/policy-engine-base:$SUITE-slim
GO=${GO:-go}
start=$(date +%s)
deadline=$((start + ${IMAGE_TEST_TIMEOUT:-1200}))
left() { local l=$((deadline - $(date +%s))); [ "$l" -gt 0 ] || { echo "image-test: out of time" >&2; exit 1; }; echo "$l"; }
step() { echo "== $* ($(($(date +%s) - start)) s)"; }

export DEBIAN_FRONTEND=noninteractive
need=()
command -v podman >/dev/null || need+=(podman)
command -v "$ENGINE_RUNTIME" >/dev/null || need+=("$ENGINE_RUNTIME")
if [ -z "${RUNTIME_IMAGE:-}" ]; then command -v mmdebstrap >/dev/null || need+=(mmdebstrap); fi
if [ "${#need[@]}" -gt 0 ]; then
  step "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

podman=(podman --runtime "$ENGINE_RUNTIME")
# Raising RLIMIT_NPROC is not permitted everywhere: set the limits the containers get.
limits=(--ulimit nproc=1000:1000 --ulimit nofile=20000:20000)

# The tests name their containers with this prefix; whatever they leave (a test killed by a
# timeout) goes when the script ends.
prefix=policy-engine-image-test-$$
tmp=$(mktemp -d)
cleanup() {
  "${podman[@]}" ps -a --filter "name=^$prefix-" --format '{{.Names}}' 2>/dev/null |
    while read -r c; do "${podman[@]}" rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

if [ -z "${RUNTIME_IMAGE:-}" ]; then
  if ! "${podman[@]}" image exists "$BASE"; then
    step "making $BASE from Debian's packages (mmdebstrap)"
    # Trimmed as the debian:*-slim images are, for the packages installed later too: no
    # documentation, manual pages or translations, and apt keeps no package cache.
    timeout "$(left)" mmdebstrap --quiet --variant=minbase \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
      --aptopt='Dir::Cache::pkgcache ""' --aptopt='Dir::Cache::srcpkgcache ""' \
      --aptopt='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; }' \
      "$SUITE" "$tmp/base.tar"
    "${podman[@]}" import --quiet "$tmp/base.tar" "$BASE" >/dev/null
    rm -f "$tmp/base.tar"
  fi
  RUNTIME_IMAGE=$BASE
fi
if [ -z "${BUILDER_IMAGE:-}" ]; then
  goroot=$("$GO" env GOROOT)
  gover=$("$GO" env GOVERSION)
  BUILDER_IMAGE=localhost/policy-engine-builder:$gover
  if ! "${podman[@]}" image exists "$BUILDER_IMAGE"; then
    step "making $BUILDER_IMAGE: $BASE with $gover"
    # The builder trusts what this host trusts (its CA bundle), so that go mod download works
    # behind a proxy that the host's bundle vouches for.
    cabundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    cat >"$tmp/Containerfile" <<EOF
FROM $BASE
RUN mkdir -p /etc/ssl/certs && cp /host-ca.crt /etc/ssl/certs/ca-certificates.crt
COPY . /usr/local/go/
ENV PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin GOTOOLCHAIN=local
EOF
    timeout "$(left)" "${podman[@]}" build --quiet --network=host "${limits[@]}" \
      -v "$cabundle:/host-ca.crt:ro" -f "$tmp/Containerfile" -t "$BUILDER_IMAGE" "$goroot" >/dev/null
  fi
fi

step "building $IMAGE (builder $BUILDER_IMAGE, runtime $RUNTIME_IMAGE)"
build_start=$(date +%s)
previous=$("${podman[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
version=$(git describe --always --dirty 2>/dev/null || echo dev)
timeout "$(left)" "${podman[@]}" build --network=host "${limits[@]}" \
  --build-arg BUILDER_IMAGE="$BUILDER_IMAGE" --build-arg RUNTIME_IMAGE="$RUNTIME_IMAGE" \
  --build-arg VERSION="$version" -t "$IMAGE" . >"$tmp/build.log" 2>&1 || {
  tail -40 "$tmp/build.log" >&2
  exit 1
}
echo "image-test: build took $(($(date +%s) - build_start)) s"
# The image this run replaced goes; the build stage's layers stay, the next build's cache.
if [ -n "$previous" ] && [ "$previous" != "$("${podman[@]}" image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  "${podman[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$IMAGE")
echo "image-test: image $IMAGE: $size bytes ($((size / 1000000)) MB)"

step "testing $IMAGE"
IMAGE_TEST=1 IMAGE_TEST_IMAGE="$IMAGE" IMAGE_TEST_ENGINE="${podman[*]}" \
  IMAGE_TEST_RUN_ARGS="${limits[*]}" IMAGE_TEST_PREFIX="$prefix" \
  timeout "$(left)" "$GO" test -count=1 -v -timeout "$(left)s" ./e2e/image/
echo "image-test: passed in $(($(date +%s) - start)) s"
