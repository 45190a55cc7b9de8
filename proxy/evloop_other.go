//go:build !linux

package proxy

// The event loops are Linux only: every spliced session runs in
// goroutines.

type evSession struct{}

type evLoops struct{}

func (s *session) startLoop(up, down *direction) bool { return false }
func (s *session) loopClosed()                        {}
func (srv *Server) stopLoops()                        {}
