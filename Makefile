# Small on purpose: the logic lives in scripts/, which CI runs directly.
.PHONY: test build deps bench deb

test:
	bash scripts/test.sh

build:
	go build -o bin/imapgate ./cmd/imapgate

deps:
	bash scripts/install-test-deps.sh

# Side by side against HAProxy and Dovecot (about 10 minutes, needs
# dovecot and haproxy); rewrites the table in BENCHMARKS.md. See bench/.
bench:
	IMAPGATE_BENCH=1 go test -run '^TestBenchmarkReport$$' -count=1 -timeout 60m -v ./bench

# The Debian package, into bin/ (deploy/README.md; scripts/package-test.sh
# also installs and checks it). VERSION=0.3.0 make deb for a release.
COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
VERSION ?= 0.0.0~git$(shell date -u +%Y%m%d).$(COMMIT)
deb:
	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)" -o bin/imapgate ./cmd/imapgate
	cd deploy/debian && go run . -binary ../../bin/imapgate -version "$(VERSION)" -out ../../bin
