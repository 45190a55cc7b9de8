package proxy

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/imapgate/imapgate/proxy/lmtp"
)

// This file plugs the LMTP front end (package proxy/lmtp, built on
// go-smtp) into the Server: a Listener with Protocol LMTP is served by
// it, with the Server's router, TLS and backend TLS, and stopped with the
// Server. LMTP has no login, so none of the IMAP session machinery
// applies; deliveries are not sessions (they are not listed or kicked).

// LMTPOptions shape the LMTP front end. Zero values mean the defaults of
// lmtp.Options.
type LMTPOptions struct {
	// Hostname for the greeting and the Received field. Empty means the
	// host name.
	Hostname string
	// MaxMessageBytes is the SIZE limit. Zero means 64 MiB.
	MaxMessageBytes int64
	// MaxRecipients per transaction. Zero means 1000.
	MaxRecipients int
	// HopLimit is the most Received fields a message may have. Zero
	// means 30.
	HopLimit int
	// RecipientDelimiter (e.g. "+") is cut from the local part before
	// routing. Empty means none.
	RecipientDelimiter string
	// CommandTimeout bounds the wait for the MTA's next command or bytes.
	// Zero means 5 min.
	CommandTimeout time.Duration
	// BackendTimeout bounds each backend exchange. Zero means 2 min.
	BackendTimeout time.Duration
}

// lmtpFront is the Server's LMTP front end, started with the first LMTP
// listener.
type lmtpFront struct {
	mu  sync.Mutex
	srv *lmtp.Server
}

func (s *Server) lmtpServer() (*lmtp.Server, error) {
	s.lmtp.mu.Lock()
	defer s.lmtp.mu.Unlock()
	if s.lmtp.srv != nil {
		return s.lmtp.srv, nil
	}
	o := s.o()
	srv, err := lmtp.NewServer(lmtp.Options{
		Router:             o.Router,
		Logger:             o.Logger.Named("lmtp"),
		TLS:                o.TLS,
		BackendTLS:         o.Backend.TLS,
		Hostname:           o.LMTP.Hostname,
		MaxMessageBytes:    o.LMTP.MaxMessageBytes,
		MaxRecipients:      o.LMTP.MaxRecipients,
		HopLimit:           o.LMTP.HopLimit,
		RecipientDelimiter: o.LMTP.RecipientDelimiter,
		Metrics:            lmtpMetrics(o.Metrics),
		Timeouts: lmtp.Timeouts{
			Command:        o.LMTP.CommandTimeout,
			BackendConnect: o.Timeouts.BackendConnect,
			Backend:        o.LMTP.BackendTimeout,
		},
	})
	if err != nil {
		return nil, err
	}
	s.lmtp.srv = srv
	return srv, nil
}

// serveLMTP serves an LMTP listener until the Server stops.
func (s *Server) serveLMTP(ln net.Listener, l Listener) error {
	srv, err := s.lmtpServer()
	if err != nil {
		ln.Close()
		return err
	}
	if !s.track(ln) {
		return ErrServerClosed
	}
	defer s.untrack(ln)
	err = srv.Serve(keepAliveListener{ln, s}, lmtp.Listener{Name: l.Name, AllowFrom: l.AllowFrom, TLS: l.Mode == ImplicitTLS})
	if s.closing.Load() {
		return ErrServerClosed
	}
	return err
}

// shutdownLMTP starts draining the LMTP front end and returns a function
// that waits for it (bounded by ctx).
func (s *Server) shutdownLMTP(ctx context.Context) (wait func()) {
	s.lmtp.mu.Lock()
	srv := s.lmtp.srv
	s.lmtp.mu.Unlock()
	if srv == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Shutdown(ctx)
	}()
	return func() { <-done }
}

func (s *Server) closeLMTP() {
	s.lmtp.mu.Lock()
	srv := s.lmtp.srv
	s.lmtp.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// lmtpMetrics passes the Server's Metrics on when it also counts
// recipients (lmtp.Metrics).
func lmtpMetrics(m Metrics) lmtp.Metrics {
	if lm, ok := m.(lmtp.Metrics); ok {
		return lm
	}
	return nil
}

// keepAliveListener gives every connection it accepts Timeouts.KeepAlive,
// as serveConn does for the other protocols: the binary's listeners leave
// keep-alive to the proxy.
type keepAliveListener struct {
	net.Listener
	s *Server
}

func (l keepAliveListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.setKeepAlive(c)
	}
	return c, err
}
