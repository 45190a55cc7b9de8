package tls13

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

// These tests hand real crypto/tls connections over to the layer after a
// real handshake over TCP, and check what crypto/tls makes of the layer's
// records and the layer of crypto/tls's, both ways.

// peer is one side carried by the layer: its socket and a read buffer.
type peer struct {
	t    *testing.T
	l    *Layer
	c    net.Conn
	buf  []byte
	have int
}

// record reads one record and opens it.
func (p *peer) record() ([]byte, bool, error) {
	p.t.Helper()
	for {
		n, err := p.l.RecordLen(p.buf[:p.have])
		if err != nil {
			return nil, false, err
		}
		if n > 0 {
			rec := append([]byte(nil), p.buf[:n]...)
			p.have = copy(p.buf, p.buf[n:p.have])
			return p.l.Open(rec)
		}
		m, err := p.c.Read(p.buf[p.have:])
		p.have += m
		if err != nil {
			return nil, false, err
		}
	}
}

// read reads n bytes of application data, answering KeyUpdates.
func (p *peer) read(n int) []byte {
	p.t.Helper()
	var got []byte
	for len(got) < n {
		data, upd, err := p.record()
		if err != nil {
			p.t.Fatalf("after %d of %d bytes: %v", len(got), n, err)
		}
		if upd {
			p.send(p.l.SealKeyUpdate(nil, false))
		}
		got = append(got, data...)
	}
	return got
}

// write seals data through Seal's slots.
func (p *peer) write(data []byte) {
	p.t.Helper()
	buf := make([]byte, SealBufLen)
	for len(data) > 0 {
		n := copy(Slot(buf, 0), data)
		n += copy(Slot(buf, 1), data[n:])
		wire, err := p.l.Seal(buf, n)
		if err != nil {
			p.t.Fatal(err)
		}
		if _, err := p.c.Write(wire); err != nil {
			p.t.Fatal(err)
		}
		data = data[n:]
	}
}

func (p *peer) send(b []byte, err error) {
	p.t.Helper()
	if err != nil {
		p.t.Fatal(err)
	}
	if _, err := p.c.Write(b); err != nil {
		p.t.Fatal(err)
	}
}

// handshake connects a crypto/tls client and server over TCP and returns
// both after their handshakes, with each side's KeyLog.
func handshake(t *testing.T, noTickets bool) (client, server *tls.Conn, ckeys, skeys *KeyLog) {
	t.Helper()
	ca := testenv.NewTestCA(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ckeys, skeys = new(KeyLog), new(KeyLog)
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		server = tls.Server(c, &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}, KeyLogWriter: skeys, SessionTicketsDisabled: noTickets})
		done <- server.Handshake()
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client = tls.Client(c, &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", KeyLogWriter: ckeys})
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.NetConn().Close(); server.NetConn().Close() })
	for _, c := range []net.Conn{client, server} {
		c.SetDeadline(time.Now().Add(20 * time.Second))
	}
	return client, server, ckeys, skeys
}

func takeOver(t *testing.T, tc *tls.Conn, keys *KeyLog) *peer {
	t.Helper()
	l, err := Takeover(tc, keys)
	if err != nil {
		t.Fatal(err)
	}
	return &peer{t: t, l: l, c: tc.NetConn(), buf: make([]byte, 64<<10)}
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestLayoutFound(t *testing.T) {
	if !Supported() {
		t.Fatal("crypto/tls's fields are not where Takeover looks: every session would stay on crypto/tls (a new Go release? update takeover.go)")
	}
}

// A crypto/tls client talks to the layer as server.
func TestDifferentialServer(t *testing.T) {
	client, server, _, skeys := handshake(t, false)
	s := takeOver(t, server, skeys)

	sizes := []int{1, 2, 100, MaxPlaintext - 1, MaxPlaintext, MaxPlaintext + 1, 2 * MaxPlaintext, 100_000}
	for _, n := range sizes {
		// client → layer: crypto/tls picks the record sizes
		want := random(t, n)
		go client.Write(want)
		if got := s.read(n); !bytes.Equal(got, want) {
			t.Fatalf("layer read %d bytes wrong", n)
		}
		// layer → client: Seal's slots, one or two records per call
		want = random(t, n)
		s.write(want)
		got := make([]byte, n)
		if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("client read %d bytes: %v", n, err)
		}
	}

	// KeyUpdate with update_requested from the layer: crypto/tls answers
	// with its own, and both directions move to new keys.
	for round := range 3 {
		s.send(s.l.SealKeyUpdate(nil, true))
		s.write([]byte("after the update\r\n"))
		got := make([]byte, 18)
		if _, err := io.ReadFull(client, got); err != nil || string(got) != "after the update\r\n" {
			t.Fatalf("round %d: client read %q, %v", round, got, err)
		}
		go client.Write([]byte("client after\r\n"))
		data, upd, err := s.record() // crypto/tls's KeyUpdate
		if err != nil || upd || len(data) != 0 {
			t.Fatalf("round %d: want the client's KeyUpdate: %q %v %v", round, data, upd, err)
		}
		if s.l.in.seq != 0 {
			t.Fatalf("read sequence %d after a KeyUpdate", s.l.in.seq)
		}
		if got := s.read(14); string(got) != "client after\r\n" {
			t.Fatalf("round %d: layer read %q", round, got)
		}
	}
	// A KeyUpdate without update_requested: crypto/tls follows, says nothing.
	s.send(s.l.SealKeyUpdate(nil, false))
	s.write([]byte("x"))
	one := make([]byte, 1)
	if _, err := io.ReadFull(client, one); err != nil || one[0] != 'x' {
		t.Fatalf("after a plain KeyUpdate: %q %v", one, err)
	}

	// close_notify both ways.
	s.send(s.l.SealAlert(nil, CloseNotify))
	if n, err := client.Read(one); n != 0 || err != io.EOF {
		t.Fatalf("client after close_notify: %d, %v, want EOF", n, err)
	}
	if _, err := s.l.Seal(make([]byte, SealBufLen), 1); err == nil {
		t.Fatal("Seal after close_notify succeeded")
	}
	go client.Close()
	if _, _, err := s.record(); err != io.EOF {
		t.Fatalf("layer after the client's close_notify: %v, want EOF", err)
	}
}

// The layer's alert reaches crypto/tls as that alert.
func TestDifferentialAlertToClient(t *testing.T) {
	client, server, _, skeys := handshake(t, false)
	s := takeOver(t, server, skeys)
	s.send(s.l.SealAlert(nil, AlertUnexpectedMessage))
	_, err := client.Read(make([]byte, 1))
	if err == nil || !strings.Contains(err.Error(), "unexpected message") {
		t.Fatalf("client: %v, want remote unexpected message", err)
	}
}

// A record the layer sealed and the network damaged: crypto/tls answers
// bad_record_mac, which the layer reads as the peer's alert.
func TestDifferentialAlertFromClient(t *testing.T) {
	client, server, _, skeys := handshake(t, false)
	s := takeOver(t, server, skeys)
	rec, err := s.l.SealRecord(nil, []byte("hello"))
	if err != nil {
		t.Fatal(err)
	}
	rec[len(rec)-1] ^= 1
	s.send(rec, nil)
	if _, err := client.Read(make([]byte, 5)); err == nil {
		t.Fatal("client read a damaged record")
	}
	_, _, err = s.record()
	var ra *RemoteAlertError
	if !errors.As(err, &ra) || ra.Alert != AlertBadRecordMAC {
		t.Fatalf("layer: %v, want the client's bad_record_mac", err)
	}
}

// The layer as client against a crypto/tls server: crypto/tls reads its
// records, and answers its KeyUpdate with update_requested.
func TestDifferentialClient(t *testing.T) {
	client, server, ckeys, _ := handshake(t, true) // a ticket would be a handshake message the layer refuses
	c := takeOver(t, client, ckeys)
	for _, n := range []int{1, MaxPlaintext, 70_000} {
		want := random(t, n)
		c.write(want)
		got := make([]byte, n)
		if _, err := io.ReadFull(server, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("server read %d: %v", n, err)
		}
		want = random(t, n)
		go server.Write(want)
		if got := c.read(n); !bytes.Equal(got, want) {
			t.Fatalf("layer read %d wrong", n)
		}
	}
	c.send(c.l.SealKeyUpdate(nil, true))
	c.write([]byte("ping"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(server, got); err != nil || string(got) != "ping" {
		t.Fatalf("server: %q %v", got, err)
	}
	go server.Write([]byte("pong"))
	if _, upd, err := c.record(); err != nil || upd {
		t.Fatalf("want the server's KeyUpdate: %v %v", upd, err)
	}
	if got := c.read(4); string(got) != "pong" {
		t.Fatalf("layer read %q", got)
	}
}

// Takeover refuses what it cannot hand over exactly, and leaves the
// connection working.
func TestTakeoverRefuses(t *testing.T) {
	t.Run("buffered record", func(t *testing.T) {
		client, server, _, skeys := handshake(t, false)
		client.Write([]byte("ab"))
		client.Write([]byte("cd"))
		one := make([]byte, 1)
		if _, err := io.ReadFull(server, one); err != nil {
			t.Fatal(err)
		}
		if _, err := Takeover(server, skeys); err == nil {
			t.Fatal("took over with unread plaintext")
		}
		rest := make([]byte, 3)
		if _, err := io.ReadFull(server, rest); err != nil || string(rest) != "bcd" {
			t.Fatalf("crypto/tls after a refused takeover: %q %v", rest, err)
		}
	})
	t.Run("no secrets", func(t *testing.T) {
		_, server, _, _ := handshake(t, false)
		if _, err := Takeover(server, new(KeyLog)); err == nil {
			t.Fatal("took over without secrets")
		}
	})
	t.Run("secrets of another connection", func(t *testing.T) {
		_, server, _, _ := handshake(t, false)
		_, _, _, other := handshake(t, false)
		if _, err := Takeover(server, other); err == nil {
			t.Fatal("took over with another connection's secrets")
		}
	})
	t.Run("TLS 1.2", func(t *testing.T) {
		ca := testenv.NewTestCA(t)
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		keys := new(KeyLog)
		srv := tls.Server(a, &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}, MaxVersion: tls.VersionTLS12, KeyLogWriter: keys})
		go tls.Client(b, &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}).Handshake()
		if err := srv.Handshake(); err != nil {
			t.Fatal(err)
		}
		var nt *ErrNotTaken
		if _, err := Takeover(srv, keys); !errors.As(err, &nt) || nt.Reason != "not TLS 1.3" {
			t.Fatalf("TLS 1.2: %v", err)
		}
	})
}
