package profile

import (
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"golang.org/x/sys/unix"
)

// BenchmarkServerHandshake measures what the server side of a TLS 1.3
// handshake costs in crypto/tls alone (no sockets: net.Pipe), as imapgate's
// listener does it, full and resumed, with X25519 only and with the
// post-quantum hybrid Go picks. The figure is server-cpu-µs/op: the CPU
// time of the OS thread the server goroutine is locked to, so the
// client's work (certificate verification among it) is not in it.
//
//	go test -run '^$' -bench ServerHandshake -benchtime 2s ./bench/profile
//
// It shows how little resumption can save here: Go's client offers only
// psk_dhe_ke (as NSS, Apple's stack and OpenSSL's default do) and Go's
// server accepts nothing else, so a resumed handshake still does the key
// exchange and skips only the certificate and its ECDSA signature.
func BenchmarkServerHandshake(b *testing.B) {
	ca := testenv.NewTestCA(b)
	for _, kx := range []struct {
		name   string
		curves []tls.CurveID
	}{{"X25519", []tls.CurveID{tls.X25519}}, {"X25519MLKEM768", nil}} {
		for _, resume := range []bool{false, true} {
			name := kx.name + "/full"
			if resume {
				name = kx.name + "/resumed"
			}
			b.Run(name, func(b *testing.B) {
				srv := &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}, NextProtos: []string{"imap"}}
				cli := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost", CurvePreferences: kx.curves, NextProtos: []string{"imap"}}
				if resume {
					cli.ClientSessionCache = tls.NewLRUClientSessionCache(1)
					handshake(b, srv, cli) // the ticket to resume with
				}
				var cpu time.Duration
				resumed := 0
				for b.Loop() {
					d, ok := handshake(b, srv, cli)
					cpu += d
					if ok {
						resumed++
					}
				}
				if resume && resumed != b.N {
					b.Fatalf("%d of %d handshakes resumed", resumed, b.N)
				}
				b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "server-cpu-µs/op")
			})
		}
	}
}

// handshake runs one handshake over net.Pipe and returns the server
// side's thread CPU time (handshake and the write of its first record,
// which carries nothing new: the ticket went with the server's flight)
// and whether the client resumed.
func handshake(b *testing.B, srv, cli *tls.Config) (time.Duration, bool) {
	sc, cc := net.Pipe()
	type result struct {
		cpu time.Duration
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		t0 := threadCPU()
		s := tls.Server(sc, srv)
		err := s.Handshake()
		if err == nil {
			_, err = s.Write([]byte("* OK\r\n"))
		}
		d := threadCPU() - t0
		sc.Close() // not s.Close: its close_notify would wait for a reader on the pipe
		done <- result{d, err}
	}()
	c := tls.Client(cc, cli)
	buf := make([]byte, 16)
	_, err := io.ReadAtLeast(c, buf, 6) // the greeting, and the ticket before it
	ok := c.ConnectionState().DidResume
	cc.Close()
	r := <-done
	if err != nil || r.err != nil {
		b.Fatalf("handshake: client %v, server %v", err, r.err)
	}
	return r.cpu, ok
}

func threadCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		panic(err)
	}
	return time.Duration(ts.Nano())
}
