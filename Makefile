# Small on purpose: the logic lives in scripts/, which CI runs directly.
.PHONY: test build deps bench

test:
	bash scripts/test.sh

build:
	go build -o bin/imapgate ./cmd/imapgate

deps:
	bash scripts/install-test-deps.sh

# Placeholder until the HAProxy comparison benchmarks exist.
bench:
	go test -run '^$$' -bench . ./...
