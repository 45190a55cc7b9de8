package main

import (
	"context"

	"github.com/imapgate/imapgate/internal/config"
	igtls "github.com/imapgate/imapgate/tls"
	"go.uber.org/zap"
)

// startTicketKeys shares the TLS session ticket keys of a.tlsProxy with
// the fleet as [tls.session_tickets] says, so that a client resumes its
// session on whichever instance the balancer sends it to. In auto mode a
// store that cannot be used is a warning (each instance keeps its own
// keys); named explicitly, it is a start-up error.
func (a *app) startTicketKeys(ctx context.Context, cfg *config.Config) error {
	tc, store, auto, err := cfg.TicketKeys()
	if err != nil || store == config.TicketsOff {
		return err
	}
	log := a.log.Named("tls")
	tc.Apply = a.tlsProxy.SetSessionTicketKeys
	tk, err := igtls.StartTicketKeys(ctx, tc, log)
	if err != nil {
		if auto {
			log.Warn("session ticket keys are not shared: each instance resumes only its own sessions", zap.Stringer("store", store), zap.Error(err))
			return nil
		}
		return err
	}
	log.Info("session ticket keys shared", zap.Stringer("store", store))
	a.closers = append(a.closers, func() { tk.Close() })
	return nil
}
