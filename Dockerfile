# policy-engine: the policy-kernel and the policy-agent in one image, run by supervisord
# (specification §9.1). Build: docker build -t policy-engine --build-arg VERSION=$(git describe --always) .
# BUILDER_IMAGE and RUNTIME_IMAGE choose the base images (a mirror, a pinned digest, or local
# images: make image-test builds from a Debian base made from Debian's packages).
ARG BUILDER_IMAGE=golang:1.26-trixie
ARG RUNTIME_IMAGE=debian:trixie-slim

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -tags vtprotobuf -trimpath \
      -ldflags "-s -w -X github.com/policy-engine/policy-engine/kernel.Version=${VERSION} -X github.com/policy-engine/policy-engine/agent.Version=${VERSION}" \
      -o /out/ ./cmd/policy-kernel ./cmd/policy-agent ./cmd/policyctl

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends supervisor ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1000 policy-engine \
 && useradd --system --uid 1000 --gid policy-engine --no-create-home --shell /usr/sbin/nologin policy-engine \
 && mkdir -p /var/run/policy-engine/agents /var/log/policy-engine /etc/policy-engine \
 && chown -R policy-engine:policy-engine /var/run/policy-engine /var/log/policy-engine
# The configs stay owned by root: the processes read them (and re-read them on SIGHUP) but
# cannot change them. Mount your own over /etc/policy-engine/.
# The image holds no credential. Its agent config takes the API key's SHA-256 from the
# environment variable POLICY_ENGINE_API_KEY_SHA256 and the JWT issuer's public key from the
# file /etc/policy-engine/keys/jwt-public.pem; without them the agent refuses to start. The
# demo keys of config/demo are for make run only (.dockerignore keeps them out of the build).
COPY config/kernel-config.yaml config/agent-config.yaml /etc/policy-engine/
COPY config/schema/ /etc/policy-engine/schema/
COPY supervisord.conf /etc/supervisord.conf
COPY --from=build /out/policy-kernel /out/policy-agent /out/policyctl /usr/local/bin/
USER policy-engine
# 9001: ext_proc (gRPC, with the gRPC health service), on 127.0.0.1 in the shipped config
# (Envoy in the same pod); 9090: the kernel's /metrics, /health/live, /health/ready. Not
# exposed: the admin listeners (/config, /debug/explain, pprof when enabled) on 127.0.0.1:9190
# (kernel) and 127.0.0.1:9191 (agent), reachable from inside the container or pod only:
# `policyctl explain --kernel-admin http://127.0.0.1:9190 ...` through kubectl exec or podman
# exec, and `policyctl validate` on the mounted configs.
EXPOSE 9001 9090
STOPSIGNAL SIGTERM
CMD ["/usr/bin/supervisord", "-c", "/etc/supervisord.conf"]
