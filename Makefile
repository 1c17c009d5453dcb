# policy-engine: see README.md.
GO        ?= go
BIN       := bin
PKGS      := ./...
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/policy-engine/policy-engine/agent.Version=$(VERSION) -X github.com/policy-engine/policy-engine/kernel.Version=$(VERSION)

.PHONY: all build run test test-unit test-e2e cover bench loadtest profile proto lint fmt vet fuzz faults soak clean docker

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/policy-kernel ./cmd/policy-agent

run: build
	./scripts/run.sh

# Every test: unit tests and the end-to-end suite (real binaries, real sockets), with the race
# detector.
test:
	$(GO) vet $(PKGS)
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) test -race -count=1 -timeout 12m $(PKGS)

cover:
	$(GO) test -count=1 -timeout 12m -coverpkg=./... -coverprofile=coverage.out $(PKGS) >/dev/null
	@$(GO) run ./scripts/coverage coverage.out

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count=1 ./internal/... ./kernel/... ./agent/... ./bench/...

loadtest: build
	$(GO) run ./loadtest/cmd/loadtest

profile: build
	./scripts/profile.sh

proto:
	./scripts/gen-proto.sh

lint: vet
	$(GO) run golang.org/x/vuln/cmd/govulncheck@v1.1.4 ./...

vet:
	$(GO) vet $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go' | grep -v '\.pb\.go$$')

# The container image (Dockerfile: both binaries under supervisord, user policy-engine).
docker:
	docker build -t policy-engine:$(VERSION) --build-arg VERSION=$(VERSION) .

clean:
	rm -rf $(BIN) run coverage.out
