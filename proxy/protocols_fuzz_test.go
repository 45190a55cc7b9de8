package proxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/imapgate/imapgate/routing"
)

// fuzzPreAuth runs one front end's pre-auth over an in-memory connection
// fed with in: it must end (never hang or panic) whatever the bytes. The
// router finds no backend, so logins end in a temporary refusal.
func fuzzPreAuth(t *testing.T, p routing.Protocol, in []byte) {
	srv, err := NewServer(Options{
		Router: routing.RouterFunc(func(context.Context, string) (*routing.Backend, error) { return nil, routing.ErrNoBackend }),
		Limits: Limits{AuthFailureDelay: -1, MaxLineLength: 1024, MaxLiteralSize: 256, MaxCommandSize: 2048},
	})
	if err != nil {
		t.Fatal(err)
	}
	server, client := net.Pipe()
	defer client.Close()
	go func() {
		client.Write(in)
		client.Close()
	}()
	go io.Copy(io.Discard, client)
	l := &Listener{Protocol: p, Mode: StartTLS, InsecureAuth: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}
	sess := newSession(srv, server, l, netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("192.0.2.2:110"))
	if sess.serve(context.Background()) {
		t.Fatal("spliced without a backend")
	}
	sess.finish()
}

func FuzzPOP3PreAuth(f *testing.F) {
	for _, s := range []string{
		"CAPA\r\nUSER alice\r\nPASS secret\r\nQUIT\r\n",
		"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
		"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n",
		"AUTH XOAUTH2\r\ndXNlcj1hQGIBYXV0aD1CZWFyZXIgdAEB\r\n",
		"AUTH\r\nSTLS\r\nNOOP\r\n",
		"a1 LOGIN x y\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) { fuzzPreAuth(t, routing.ProtocolPOP3, in) })
}

func FuzzSievePreAuth(f *testing.F) {
	for _, s := range []string{
		"CAPABILITY\r\nNOOP \"t\"\r\nLOGOUT\r\n",
		"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHNlY3JldA==\"\r\n",
		"AUTHENTICATE \"PLAIN\" {20+}\r\nAGFsaWNlAHNlY3JldA==\r\n",
		"AUTHENTICATE \"PLAIN\"\r\n\"AGFsaWNlAHNlY3JldA==\"\r\n",
		"STARTTLS\r\nHAVESPACE \"x\" 1\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) { fuzzPreAuth(t, routing.ProtocolSieve, in) })
}
