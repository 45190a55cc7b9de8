//go:build !linux

package proxy

import (
	"crypto/tls"
	"net"
)

// Without Linux every session stays on crypto/tls.

type recordConn struct{ *nbConn }

func (s *session) keyLogFor(conn any, cfg *tls.Config) *tls.Config { return cfg }
func (s *session) takeOverRecords()                                {}
func (rc *recordConn) sleep(bool)                                  {}
func (rc *recordConn) closeNotify()                                {}
func (d *direction) copyRecordsIn() error                          { panic("unreachable") }
func (d *direction) copyRecordsOut() error                         { panic("unreachable") }
func greetInFlight(net.Conn, *tls.Conn, string)                    {}
func greetedInFlight(net.Conn) bool                                { return false }
