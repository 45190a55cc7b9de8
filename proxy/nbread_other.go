//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// Without Linux the splice reads as io.Copy does.
type nbReader struct{ drained bool }

func (r *nbReader) init(net.Conn) bool         { return false }
func (r *nbReader) read(p []byte) (int, error) { panic("unreachable") }
func (r *nbReader) wait() error                { panic("unreachable") }
func wrapForSplice(c net.Conn) net.Conn        { return c }

type nbConn struct {
	net.Conn
	nb       nbReader
	nonblock bool
}

var errWouldBlock error = syscall.EAGAIN
