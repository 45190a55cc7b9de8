//go:build !linux

package proxy

import "syscall"

const canSplice = false

// waitReadable is not available here: directions keep a buffer while they
// wait, as io.Copy would.
func waitReadable(rc syscall.RawConn) (int, error) { return 1, nil }
