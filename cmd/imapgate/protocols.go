package main

import (
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
)

// registrationName is a listener's name (and tag) in imapgate's own
// Consul registration: imap or imaps, pop3 or pop3s, sieve, lmtp.
func registrationName(sp config.ListenerSpec) string {
	name := sp.Listener.Protocol.String()
	if sp.Listener.Protocol == routing.ProtocolIMAP || sp.Listener.Protocol == routing.ProtocolPOP3 {
		if sp.Listener.Mode == proxy.ImplicitTLS {
			name += "s"
		}
	}
	return name
}
