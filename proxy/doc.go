// Package proxy is imapgate's front end: it accepts mail clients, answers
// them until they log in, logs in to the backend the router names for
// the user, and then splices the two connections. One placement serves
// every protocol; the shared machinery (listeners, TLS and STARTTLS,
// PROXY protocol in, limits and failure buckets, per-IP accounting, the
// backend dial with TLS/STARTTLS and PROXY protocol out, the parked
// splice, drain, the sessions index with kicks and evictions, metrics) is
// used by one front end per protocol:
//
//   - IMAP, the reference: imap.go (the pre-auth loop and the dispatcher
//     that writes each handler's reply), one imap_*.go file per command
//     (capability, noop, logout, starttls, id, enable, login,
//     authenticate), command.go (the pre-auth reader), backend.go (the
//     backend login).
//   - POP3: pop3.go (pre-auth), pop3_backend.go (backend login).
//   - ManageSieve: sieve.go (pre-auth), sieve_parse.go (its reader),
//     sieve_backend.go (backend login).
//   - LMTP (delivery, no login, no splice): lmtp.go plugs package
//     proxy/lmtp in.
//
// session.go is the session's life in every protocol, state.go its
// typed states and end reasons, login.go a login's shared steps (limits,
// route, backend login, commit), sasl.go the shared SASL exchange, and
// protocols.go what the shared code says differently per protocol.
//
// Typical use:
//
//	srv, err := proxy.NewServer(proxy.Options{Router: r, TLS: cfg, Logger: log})
//	go srv.Serve(ln993, proxy.Listener{Mode: proxy.ImplicitTLS})
//	go srv.Serve(ln995, proxy.Listener{Protocol: routing.ProtocolPOP3})
//	go srv.Serve(ln24, proxy.Listener{Protocol: routing.ProtocolLMTP, Mode: proxy.StartTLS, AllowFrom: mtas})
//	...
//	srv.Shutdown(ctx) // drains every protocol
//
// A Server is also the routing.Evictor: a router that moves a user calls
// EvictUser, and the user's sessions on the old backend end, each told in
// its own protocol. Idle spliced sessions hold no goroutine: their sockets
// wait in one epoll set per Server (see splice.go); such a session ends
// when a socket closes or fails, or a kick closes it: the direction that
// notices records the EndReason, and the last of the two directions to
// stop calls Server.endSession, which logs the summary line. A TLS 1.3
// session taken over by the record layer, with a plain-TCP backend, runs
// no direction goroutines at all: one of a few event loops serves it
// (evloop_linux.go), and ends it through the same steps. README.md in
// this directory tells the whole life of a session, step by step, and
// what a client sees when things fail.
package proxy
