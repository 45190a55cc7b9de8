package main

import (
	"context"
	"fmt"

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
	st := cfg.TLS.SessionTickets
	kind, auto := st.Store, st.Store == ""
	if auto {
		switch {
		case cfg.Routing.Router == "consul" || cfg.TLS.ACME.Storage == "consul":
			kind = "consul"
		case st.File != "":
			kind = "file"
		default:
			kind = "off"
		}
	}
	var store igtls.TicketKeyStore
	switch kind {
	case "off":
		return nil
	case "file":
		if st.File == "" {
			return fmt.Errorf("tls.session_tickets: store = \"file\" needs file")
		}
		store = &igtls.FileTicketStore{Path: st.File}
	case "consul":
		client, err := cfg.ConsulClient()
		if err != nil {
			return fmt.Errorf("tls.session_tickets: %w", err)
		}
		key := st.ConsulKey
		if key == "" {
			key = igtls.DefaultConsulTicketKey
		}
		store = &igtls.ConsulTicketStore{KV: client.KV(), Key: key}
	default:
		return fmt.Errorf("tls.session_tickets.store: unknown store %q (want consul, file or off)", st.Store)
	}
	log := a.log.Named("tls")
	tk, err := igtls.StartTicketKeys(ctx, igtls.TicketKeysConfig{
		Store:    store,
		Rotation: st.Rotation.D(),
		Keep:     st.Keep,
		Apply:    a.tlsProxy.SetSessionTicketKeys,
	}, log)
	if err != nil {
		if auto {
			log.Warn("session ticket keys are not shared: each instance resumes only its own sessions", zap.String("store", kind), zap.Error(err))
			return nil
		}
		return err
	}
	log.Info("session ticket keys shared", zap.String("store", kind))
	a.closers = append(a.closers, func() { tk.Close() })
	return nil
}
