package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/imapgate/imapgate/routing"
)

// errNotPlaced is a login the backend accepted but the router did not
// place there: another backend won a placement race or the user moved
// while logging in. The client is told to retry (NO [UNAVAILABLE]); the
// retry goes to the right backend.
var errNotPlaced = errors.New("proxy: login accepted by a backend the user is not placed on")

// commitRoute tells the router that b accepted user's login (every front
// end calls it between the backend's OK and the client's). A router that
// records placements (routing.Committer) answers where the user must be;
// for the others the route is looked up again, since the user may have
// moved between the lookup and the moment the session became evictable.
// On an error conn (the backend connection) is closed and the user must
// not be served.
func (s *Server) commitRoute(ctx context.Context, user string, b *routing.Backend, conn net.Conn) error {
	r := s.o().Router
	var got *routing.Backend
	var err error
	if c, ok := r.(routing.Committer); ok {
		got, err = c.Commit(ctx, user, b)
	} else if got, err = r.Route(ctx, user); err != nil {
		got, err = b, nil // the route was fine a moment ago: keep it
	}
	switch {
	case err != nil:
		err = fmt.Errorf("%w: %w", errNotPlaced, err)
	case got.ID != b.ID:
		err = fmt.Errorf("%w: placed on %s, logged in to %s", errNotPlaced, got.ID, b.ID)
	}
	if err != nil {
		conn.Close()
	}
	return err
}

// maxConcurrentKicks bounds the kicks that run at once. A kick waits at
// most about two seconds (the pump's write deadline, then the BYE's), so
// a batch of n stuck sessions takes about 2s × n/maxConcurrentKicks.
const maxConcurrentKicks = 1024

// kickConcurrently kicks victims concurrently: a
// client that does not read delays nobody else's kick.
func (s *Server) kickConcurrently(reason EndReason, text string, victims []*session) {
	if len(victims) == 1 {
		victims[0].kick(reason, text)
		return
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, min(len(victims), maxConcurrentKicks))
	for _, v := range victims {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			v.kick(reason, text)
		})
	}
	wg.Wait()
}

// RoutedUsers returns the users with routed sessions here (logging in or
// logged in), so that a router can check them all after its table
// changed. It implements routing.UserLister.
func (s *Server) RoutedUsers() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.byUser))
	for u := range s.byUser {
		out = append(out, u)
	}
	return out
}

var _ routing.UserLister = (*Server)(nil)
