package tls13

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// flightConn is the server's socket: its Write calls SealInFlight once the
// server's application secret is logged, as proxy's nbConn does, and it
// records what each write carried.
type flightConn struct {
	net.Conn
	tc       *tls.Conn
	keys     *KeyLog
	greeting []byte

	mu      sync.Mutex
	writes  int
	sealed  int // the write that carried the greeting, from 1; 0: none
	refusal error
	hs      int // writes during the handshake
}

func (c *flightConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes++
	if c.greeting != nil && c.keys.HasServerSecret() {
		rec, err := SealInFlight(c.tc, c.keys, c.greeting)
		c.greeting = nil
		if err != nil {
			c.refusal = err
		} else {
			c.sealed = c.writes
			c.mu.Unlock()
			n, err := c.Conn.Write(append(append([]byte(nil), p...), rec...))
			return min(n, len(p)), err
		}
	}
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// holdConn is the client's socket: once the client has its application
// secrets (it has read the server's Finished), it keeps what the client
// writes (its Finished) until release, so that the server cannot have
// read the client's Finished when the client reads.
type holdConn struct {
	net.Conn
	keys *KeyLog // the client's
	mu   sync.Mutex
	held []byte
	hold bool
}

func (c *holdConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.keys.mu.Lock()
	secrets := c.keys.client != nil
	c.keys.mu.Unlock()
	if c.hold && secrets {
		c.held = append(c.held, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *holdConn) release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hold = false
	_, err := c.Conn.Write(c.held)
	c.held = nil
	return err
}

// serveOne accepts one connection on loopback and runs serve on it (with
// a 20 s deadline); its error comes on the channel.
func serveOne(t *testing.T, serve func(net.Conn) error) (string, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		defer ln.Close()
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		done <- serve(c)
	}()
	return ln.Addr().String(), done
}

// inFlight runs one handshake of a client with cfg against a server that
// seals a greeting into its flight, and a short conversation after it:
// the server writes through crypto/tls after the greeting, and the client
// answers. It returns what the server's conn recorded.
func inFlight(t *testing.T, ccfg, scfg *tls.Config, hold bool) (*flightConn, tls.ConnectionState) {
	t.Helper()
	const greeting = "* OK hello\r\n"
	fc := &flightConn{keys: new(KeyLog), greeting: []byte(greeting)}
	scfg = scfg.Clone()
	scfg.KeyLogWriter = fc.keys
	addr, done := serveOne(t, func(c net.Conn) error {
		fc.Conn = c
		fc.tc = tls.Server(fc, scfg)
		if err := fc.tc.Handshake(); err != nil {
			return err
		}
		fc.mu.Lock()
		fc.hs = fc.writes
		fc.mu.Unlock()
		r := bufio.NewReader(fc.tc)
		line, err := r.ReadString('\n')
		if err == nil && line != "a NOOP\r\n" {
			err = fmt.Errorf("server read %q", line)
		}
		if err == nil {
			_, err = fc.tc.Write([]byte("a OK done\r\n"))
		}
		return err
	})
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(20 * time.Second))
	hc := &holdConn{Conn: raw, hold: hold, keys: new(KeyLog)}
	ccfg = ccfg.Clone()
	ccfg.KeyLogWriter = hc.keys
	client := tls.Client(hc, ccfg)
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(client)
	if line, err := r.ReadString('\n'); err != nil || line != greeting {
		t.Fatalf("greeting: %q, %v", line, err)
	}
	if hold {
		if len(hc.held) == 0 {
			t.Fatal("the client's Finished was not held")
		}
		if err := hc.release(); err != nil {
			t.Fatal(err)
		}
	}
	client.Write([]byte("a NOOP\r\n"))
	if line, err := r.ReadString('\n'); err != nil || line != "a OK done\r\n" {
		t.Fatalf("after the greeting: %q, %v", line, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return fc, client.ConnectionState()
}

// The greeting rides on the server's first flight: the client reads it
// before the server can have read the client's Finished, and crypto/tls's
// own records after it decrypt (the sequence number moved past it), with
// and without a session ticket in the flight, and when resuming.
func TestSealInFlight(t *testing.T) {
	ca := testenv.NewTestCA(t)
	scfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}}
	scfg.SetSessionTicketKeys([][32]byte{{1}}) // one key for every clone
	cache := tls.NewLRUClientSessionCache(4)
	ccfg := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", ClientSessionCache: cache}
	for _, tc := range []struct {
		name    string
		scfg    *tls.Config
		resumed bool
	}{
		{"with a ticket", scfg, false},
		{"resumed", scfg, true},
		{"no tickets", &tls.Config{Certificates: scfg.Certificates, SessionTicketsDisabled: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc, cs := inFlight(t, ccfg, tc.scfg, true)
			if cs.DidResume != tc.resumed {
				t.Fatalf("resumed: %v, want %v", cs.DidResume, tc.resumed)
			}
			if fc.sealed != 1 || fc.refusal != nil {
				t.Fatalf("greeting sealed into write %d (refusal %v), want the first", fc.sealed, fc.refusal)
			}
		})
	}
}

// A HelloRetryRequest is written before the server has its traffic
// secrets: the greeting goes with the second flight. A TLS 1.2 handshake
// is refused and the server's conn is left alone.
func TestSealInFlightRefuses(t *testing.T) {
	ca := testenv.NewTestCA(t)
	scfg := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}, CurvePreferences: []tls.CurveID{tls.CurveP384}}
	t.Run("hello retry", func(t *testing.T) {
		// The client's key share is P-256's, the server wants P-384.
		ccfg := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", CurvePreferences: []tls.CurveID{tls.CurveP256, tls.CurveP384}}
		fc, _ := inFlight(t, ccfg, scfg, true)
		if fc.hs < 2 || fc.sealed != fc.hs {
			t.Fatalf("greeting sealed into write %d of the handshake's %d (refusal %v), want the last (after the HelloRetryRequest)", fc.sealed, fc.hs, fc.refusal)
		}
	})
	t.Run("TLS 1.2", func(t *testing.T) {
		keys := new(KeyLog)
		cfg := scfg.Clone()
		cfg.KeyLogWriter = keys
		addr, errc := serveOne(t, func(c net.Conn) error {
			s := tls.Server(c, cfg)
			if err := s.Handshake(); err != nil {
				return err
			}
			_, err := SealInFlight(s, keys, []byte("x"))
			return err
		})
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", MaxVersion: tls.VersionTLS12})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := <-errc; err == nil || !strings.Contains(err.Error(), "staying on crypto/tls") {
			t.Fatalf("SealInFlight on TLS 1.2: %v", err)
		}
	})
}
