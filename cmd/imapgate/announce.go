package main

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"go.uber.org/zap"

	"github.com/imapgate/imapgate/routing"
)

// announcer is a router that can be told a placement changed outside
// imapgate: the Consul router on its change feed (consul.users_watch =
// "feed"), after an operator's `consul kv put` or `consul kv delete`.
type announcer interface {
	Announce(ctx context.Context, users ...string) error
}

// announceReply is POST /admin/users/{user}/announce.
type announceReply struct {
	User string `json:"user"`
}

// handleAnnounce appends the user to the Consul change feed, so that
// every instance re-reads their entry and closes their sessions on any
// other backend.
func (a *app) handleAnnounce(w http.ResponseWriter, r *http.Request) {
	user := routing.NormalizeUser(r.PathValue("user"))
	if user == "" {
		writeError(w, errorf(http.StatusBadRequest, "empty user name"))
		return
	}
	an, ok := a.router.(announcer)
	if !ok {
		writeError(w, errorf(http.StatusNotImplemented, "this router has no change feed: nothing to announce"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
	defer cancel()
	err := an.Announce(ctx, user)
	a.metrics.adminAction("announce", err)
	if err != nil {
		a.log.Warn("admin: announce failed", zap.String("user", user), zap.Error(err))
		writeError(w, errorf(http.StatusServiceUnavailable, "cannot write the change feed (is consul reachable?)"))
		return
	}
	a.log.Info("admin: changed placement announced", zap.String("user", user))
	writeJSON(w, http.StatusOK, announceReply{User: user})
}

func (c *ctlClient) announce(ctx context.Context, user string) error {
	var r announceReply
	if err := c.get(ctx, "POST", "/admin/users/"+url.PathEscape(user)+"/announce", nil, &r); err != nil || c.json {
		return err
	}
	fmt.Fprintf(c.stdout, "announced %s: every instance re-reads the entry\n", r.User)
	return nil
}
