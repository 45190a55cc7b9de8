package proxy

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"unsafe"

	"github.com/imapgate/imapgate/internal/testenv"
)

// TestReleaseTLSBuffersFindsFields fails when a Go release renames or
// retypes the tls.Conn fields releaseTLSBuffers needs (it then releases
// nothing, silently, and idle sessions grow again).
func TestReleaseTLSBuffersFindsFields(t *testing.T) {
	if !tlsBufs.ok {
		t.Fatal("crypto/tls.Conn has no rawInput/input/hand of the expected types: releaseTLSBuffers is a no-op")
	}
}

func rawInputCap(c *tls.Conn) int {
	return (*bytes.Buffer)(unsafe.Add(unsafe.Pointer(c), tlsBufs.rawInput)).Cap()
}

// TestReleaseTLSBuffers: after a 64 KiB upload the server's record buffer
// holds a full record; released, it is gone, and the stream goes on
// unharmed both ways.
func TestReleaseTLSBuffers(t *testing.T) {
	ca := testenv.NewTestCA(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	upload := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	clientDone := make(chan error, 1)
	go func() {
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"})
		if err != nil {
			clientDone <- err
			return
		}
		defer c.Close()
		if _, err := c.Write(upload); err != nil {
			clientDone <- err
			return
		}
		var ack [1]byte
		if _, err := io.ReadFull(c, ack[:]); err != nil { // released by now
			clientDone <- err
			return
		}
		_, err = c.Write([]byte("after\r\n"))
		clientDone <- err
	}()
	raw, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	s := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{ca.ServerCert}})
	got := make([]byte, len(upload))
	if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, upload) {
		t.Fatalf("upload: %v (equal %v)", err, bytes.Equal(got, upload))
	}
	if c := rawInputCap(s); c < 16<<10 {
		t.Fatalf("record buffer after the upload holds %d bytes: the test does not show what it should", c)
	}
	if !releaseTLSBuffers(s) {
		t.Fatal("nothing released with every buffer empty")
	}
	if c := rawInputCap(s); c != 0 {
		t.Fatalf("record buffer keeps %d bytes after release", c)
	}
	if _, err := s.Write([]byte("+")); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, len("after\r\n"))
	if _, err := io.ReadFull(s, line); err != nil || string(line) != "after\r\n" {
		t.Fatalf("after release: %q, %v", line, err)
	}
	if err := <-clientDone; err != nil {
		t.Fatal(err)
	}
}
