package main

import (
	_ "embed"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/memimap"
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
	users := make(map[string]string, len(demoUsers))
	for _, u := range demoUsers {
		users[u[0]] = u[1]
	}
	var stops []func()
	stop := func() {
		for _, s := range stops {
			s()
		}
	}
	for _, name := range []string{"demo1", "demo2"} {
		srv, err := memimap.Start(name, users)
		if err != nil {
			stop()
			return nil, err
		}
		stops = append(stops, func() { srv.Close() })
		addr := srv.Addr
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
