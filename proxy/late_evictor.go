package proxy

import (
	"sync/atomic"

	"github.com/imapgate/imapgate/routing"
)

// LateEvictor is the routing.Evictor (and routing.UserLister) of a router
// built before the Server it evicts through: the Server needs the router,
// the router needs its Evictor. Until Set it evicts nothing and lists no
// one, which is right: no session exists before the Server does.
type LateEvictor struct{ srv atomic.Pointer[Server] }

var (
	_ routing.Evictor    = (*LateEvictor)(nil)
	_ routing.UserLister = (*LateEvictor)(nil)
)

// Set makes s the Server evictions go to.
func (l *LateEvictor) Set(s *Server) { l.srv.Store(s) }

// EvictUser implements routing.Evictor.
func (l *LateEvictor) EvictUser(user, keep string) int {
	if s := l.srv.Load(); s != nil {
		return s.EvictUser(user, keep)
	}
	return 0
}

// EvictBackend implements routing.Evictor.
func (l *LateEvictor) EvictBackend(id string) int {
	if s := l.srv.Load(); s != nil {
		return s.EvictBackend(id)
	}
	return 0
}

// RoutedUsers implements routing.UserLister.
func (l *LateEvictor) RoutedUsers() []string {
	if s := l.srv.Load(); s != nil {
		return s.RoutedUsers()
	}
	return nil
}
