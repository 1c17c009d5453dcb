# policy-engine: see README.md.
GO        ?= go
BIN       := bin
PKGS      := ./...
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
# go-control-plane compiles its generated fast marshalling code (which internal/vtcodec uses
# for the ext_proc replies) only with this tag; every go command below gets it.
export GOFLAGS += -tags=vtprotobuf
LDFLAGS   := -s -w -X github.com/policy-engine/policy-engine/agent.Version=$(VERSION) -X github.com/policy-engine/policy-engine/kernel.Version=$(VERSION)

.PHONY: all build run test test-unit test-e2e cover bench loadtest profile proto lint fmt vet fuzz faults soak clean docker image-test

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/policy-kernel ./cmd/policy-agent ./cmd/policyctl ./loadtest/cmd/extproc-noop

run: build
	./scripts/run.sh

# Every test: unit tests and the end-to-end suite (real binaries, real sockets), with the race
# detector; then the Helm chart's tests, a module of their own (deploy/helmtest) so that Helm
# and the Kubernetes API types stay out of the binaries' module. First what the tests need
# besides Go (scripts/test-deps.sh: installed as root on Debian, named elsewhere), and go.mod
# and go.sum of both modules exactly as go mod tidy would write them.
test:
	GO=$(GO) ./scripts/test-deps.sh
	@d=$$($(GO) mod tidy -diff 2>&1) && [ -z "$$d" ] || { echo "$$d"; echo "go.mod or go.sum is not what go mod tidy writes: run go mod tidy"; exit 1; }
	@d=$$(cd deploy/helmtest && $(GO) mod tidy -diff 2>&1) && [ -z "$$d" ] || { echo "$$d"; echo "deploy/helmtest: go.mod or go.sum is not what go mod tidy writes: run go mod tidy there"; exit 1; }
	$(GO) vet $(PKGS)
	cd deploy/helmtest && $(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) test -race -count=1 -timeout 12m $(PKGS)
	cd deploy/helmtest && $(GO) test -count=1 -timeout 10m ./...

# The fault suite in its long form: longer traffic and more kill, reload and early-end cycles
# (make test runs the short form). Every test logs its figures on "reliability:" lines.
faults:
	FAULTS_FULL=1 $(GO) test -race -count=1 -timeout 30m -v ./e2e/faults/

# Ten minutes of steady traffic, with reloads and streams ended early: RSS and goroutines of both
# processes must stay flat. FAULTS_SOAK sets the duration.
SOAK ?= 10m
soak:
	FAULTS_SOAK=$(SOAK) $(GO) test -count=1 -timeout 30m -v -run '^TestSoak$$' ./e2e/faults/

# Every native fuzz target, one at a time on one worker, FUZZTIME each; FUZZ picks targets by a
# regular expression on "package target".
FUZZTIME ?= 5m
FUZZ ?= .
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) FUZZ='$(FUZZ)' ./scripts/fuzz.sh

cover:
	$(GO) test -count=1 -timeout 12m -coverpkg=./... -coverprofile=coverage.out $(PKGS) >/dev/null
	@$(GO) run ./scripts/coverage coverage.out

# Benchmarks of the hot path with allocation counts; compare two runs with benchstat (see the
# comments of kernel/bench_test.go).
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./internal/... ./kernel/... ./agent/... ./bench/... ./policies/...

# A measurement, not a test: kernel + agent against the no-op baseline (docs/performance.md).
# LOADTEST_ARGS passes flags, e.g. LOADTEST_ARGS='-scenario jwt-cached' for a cached JWT route.
LOADTEST_ARGS ?=
loadtest: build
	$(GO) run ./loadtest/cmd/loadtest $(LOADTEST_ARGS)

profile: build
	./scripts/profile.sh

proto:
	./scripts/gen-proto.sh

lint: vet
	$(GO) run golang.org/x/vuln/cmd/govulncheck@v1.1.4 ./...

vet:
	$(GO) vet $(PKGS)
	cd deploy/helmtest && $(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go' | grep -v '\.pb\.go$$')

# The container image (Dockerfile: both binaries under supervisord, user policy-engine).
docker:
	docker build -t policy-engine:$(VERSION) --build-arg VERSION=$(VERSION) .

# The image built from the Dockerfile with Podman and tested from outside (scripts/image-test.sh,
# e2e/image): needs root, about 4 minutes from a cold cache; not part of make test.
image-test:
	GO=$(GO) ./scripts/image-test.sh

clean:
	rm -rf $(BIN) run coverage.out
