// Package proxy is imapgate's IMAP front end: it accepts mail clients,
// answers the Not Authenticated state itself (CAPABILITY, STARTTLS, ID,
// LOGIN, AUTHENTICATE), asks a routing.Router which backend owns the user,
// logs in there with the client's credentials, and then splices the rest
// of the session through byte for byte.
//
// Typical use:
//
//	srv, err := proxy.NewServer(proxy.Options{Router: r, TLS: cfg, Logger: log})
//	go srv.Serve(ln, proxy.Listener{Name: "imaps", Mode: proxy.ImplicitTLS})
//	...
//	err = srv.Shutdown(ctx) // stop accepting, BYE before login, wait, then close
//
// A Server is also the routing.Evictor: a router that moves a user calls
// EvictUser, and the user's sessions on the old backend end with a BYE.
// Idle spliced sessions hold no goroutine: their sockets wait in one epoll
// set per Server (see splice.go). README.md in this directory tells the
// whole life of a session and what a client sees when things fail.
package proxy
