# Small on purpose: the logic lives in scripts/, which CI runs directly.
.PHONY: test build deps bench

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
