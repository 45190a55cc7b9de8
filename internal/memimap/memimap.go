// Package memimap runs go-imap's in-memory IMAP server on a loopback
// port: the backends of imapgate's embedded demo, and the fast in-process
// backends of its tests (where a real Dovecot is not the point).
//
// Typical use:
//
//	srv, err := memimap.Start("demo1", map[string]string{"alice@example.org": "alicepass"})
//	defer srv.Close()
//	// srv.Addr is "127.0.0.1:PORT"; each INBOX holds a message whose
//	// subject is "Hello from backend demo1".
package memimap

import (
	"fmt"
	"net"
	"strings"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
	"github.com/emersion/go-imap/v2/imapserver/imapmemserver"
)

// Server is a running in-memory IMAP server.
type Server struct {
	// Addr is where it listens, "127.0.0.1:PORT".
	Addr string
	srv  *imapserver.Server
	done chan struct{}
}

// Start listens on a free loopback port with users (name → password).
// If name is not empty, each user's INBOX starts with one message whose
// subject is "Hello from backend NAME", so a client can tell which
// backend it reached. It speaks IMAP4rev1 and IMAP4rev2, cleartext only
// (it sits behind imapgate on loopback).
func Start(name string, users map[string]string) (*Server, error) {
	mem := imapmemserver.New()
	for u, p := range users {
		user := imapmemserver.NewUser(u, p)
		if err := user.Create("INBOX", nil); err != nil {
			return nil, err
		}
		if name != "" {
			body := fmt.Sprintf("From: imapgate <demo@localhost>\r\nTo: %s\r\nSubject: Hello from backend %s\r\n\r\nYou reached %s through imapgate.\r\n", u, name, name)
			if _, err := user.Append("INBOX", strings.NewReader(body), &imap.AppendOptions{}); err != nil {
				return nil, err
			}
		}
		mem.AddUser(user)
	}
	srv := imapserver.New(&imapserver.Options{
		NewSession: func(*imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			return mem.NewSession(), nil, nil
		},
		Caps:         imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapIMAP4rev2: {}},
		InsecureAuth: true,
		Logger:       discard{},
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &Server{Addr: ln.Addr().String(), srv: srv, done: make(chan struct{})}
	go s.serve(ln)
	return s, nil
}

func (s *Server) serve(ln net.Listener) {
	defer close(s.done)
	s.srv.Serve(ln)
}

// Close stops the server and waits for it.
func (s *Server) Close() error {
	err := s.srv.Close()
	<-s.done
	return err
}

type discard struct{}

func (discard) Printf(string, ...any) {}
func (discard) Println(...any)        {}
