// Package test holds imapgate's integration tests: the ones that span
// packages, as CoreDNS's test/ and maddy's tests/ do. Each runs a
// proxy.Server in-process with a real router (routing/consul against a
// real Consul), real certificates (the tls package's ACME against a real
// Pebble) and real Dovecot backends (internal/testenv), and judges what
// a client sees. The proxy's own tests stay in proxy/ and need none of
// these packages.
//
//	go test ./test/                         # every integration test
//	go test -run TestConsulRouting ./test/  # one
//	go test -run '^$' -bench BenchmarkConsulLogin ./test/
package test
