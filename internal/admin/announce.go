package admin

import (
	"context"
	"net/http"

	"go.uber.org/zap"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/routing"
)

// announcer is a router that can be told a placement changed outside
// imapgate: the Consul router on its change feed (consul.users_watch =
// "feed"), after an operator's `consul kv put` or `consul kv delete`.
type announcer interface {
	Announce(ctx context.Context, users ...string) error
}

// handleAnnounce appends the user to the Consul change feed, so that
// every instance re-reads their entry and closes their sessions on any
// other backend.
func (s *Server) handleAnnounce(w http.ResponseWriter, r *http.Request) {
	user := routing.NormalizeUser(r.PathValue("user"))
	if user == "" {
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	}
	an, ok := s.o.Router.(announcer)
	if !ok {
		writeError(w, errorf(http.StatusNotImplemented, "this router has no change feed: nothing to announce"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminapi.Timeout)
	defer cancel()
	err := an.Announce(ctx, user)
	s.o.Metrics.AdminAction("announce", err)
	if err != nil {
		s.log.Warn("admin: announce failed", zap.String("user", user), zap.Error(err))
		writeError(w, errorf(http.StatusServiceUnavailable, "cannot write the change feed (is consul reachable?)"))
		return
	}
	s.log.Info("admin: changed placement announced", zap.String("user", user))
	writeJSON(w, http.StatusOK, adminapi.AnnounceReply{User: user})
}
