package main

import (
	"fmt"
	"io"
)

// ctl runs the operator subcommands against a running imapgate's admin API.
func ctl(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "imapgate ctl: the admin API client is not built yet")
	return 2
}
