package main

import (
	_ "embed"
	"fmt"
	"net"
	"strings"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
	"github.com/emersion/go-imap/v2/imapserver/imapmemserver"
	"github.com/imapgate/imapgate/internal/config"
	"go.uber.org/zap"
)

//go:embed demo.toml
var demoConfig string

// demoUsers log in to the demo. They are printed at start-up: nothing
// here is secret.
var demoUsers = [][2]string{
	{"alice@example.org", "alicepass"},
	{"bob@example.org", "bobpass"},
	{"carol@example.net", "carolpass"},
	{"dave@example.net", "davepass"},
}

// startDemo starts the demo's in-process backends, points cfg's backends
// at them and returns a function that stops them.
func startDemo(cfg *config.Config, log *zap.Logger) (func(), error) {
	var stops []func()
	stop := func() {
		for _, s := range stops {
			s()
		}
	}
	for _, name := range []string{"demo1", "demo2"} {
		addr, s, err := startMemServer(name)
		if err != nil {
			stop()
			return nil, err
		}
		stops = append(stops, s)
		b := cfg.Backends[name]
		b.Addr = addr
		cfg.Backends[name] = b
		log.Info("demo backend started", zap.String("backend", name), zap.String("addr", addr))
	}
	for _, u := range demoUsers {
		log.Info("demo user", zap.String("user", u[0]), zap.String("password", u[1]))
	}
	return stop, nil
}

// startMemServer runs go-imap's in-memory server with the demo users.
func startMemServer(name string) (string, func(), error) {
	mem := imapmemserver.New()
	for _, u := range demoUsers {
		user := imapmemserver.NewUser(u[0], u[1])
		if err := user.Create("INBOX", nil); err != nil {
			return "", nil, err
		}
		// Tell the users which backend they landed on.
		body := fmt.Sprintf("From: imapgate <demo@localhost>\r\nTo: %s\r\nSubject: Hello from backend %s\r\n\r\nYou reached %s through imapgate.\r\n", u[0], name, name)
		if _, err := user.Append("INBOX", strings.NewReader(body), &imap.AppendOptions{}); err != nil {
			return "", nil, err
		}
		mem.AddUser(user)
	}
	srv := imapserver.New(&imapserver.Options{
		NewSession: func(*imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			return mem.NewSession(), nil, nil
		},
		Caps: imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapIMAP4rev2: {}},
		// Loopback only, behind imapgate's TLS.
		InsecureAuth: true,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	go srv.Serve(ln)
	return ln.Addr().String(), func() { srv.Close() }, nil
}
