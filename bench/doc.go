// Package bench is imapgate's benchmark room: the raw-IMAP load generator
// used by cmd/imapgate-bench (client.go, scenario.go), the process meters
// that read a proxy's CPU and RSS from /proc (proc.go), the report format
// of BENCHMARKS.md (report.go), and the side-by-side harnesses that run
// imapgate, HAProxy and nginx in front of the same Dovecot in one run
// (harness_test.go, nginx_test.go, `make bench`). The long load run
// (load_test.go) only runs with IMAPGATE_LOAD=1.
//
// Figures from these harnesses are ratios measured in the same run; none
// of them is asserted by a unit test.
package bench
