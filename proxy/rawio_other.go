//go:build !linux

package proxy

import (
	"net"
	"syscall"
)

// rawIO says rawRead and rawWrite exist here: not outside Linux, where
// sockets are written through net.Conn.
const rawIO = false

func rawWrite(syscall.RawConn, []byte) (int, error) { panic("unreachable") }

func rawIOConn(c net.Conn) net.Conn { return c }
