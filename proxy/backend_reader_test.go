package proxy

import (
	"strings"
	"testing"
)

// A reader given back with bytes still buffered must not hand them to the
// next backend connection that takes it.
func TestBackendReaderDropsBufferedBytes(t *testing.T) {
	br := getBackendReader(strings.NewReader("* OK first\r\nig1 OK left over\r\n"))
	bc := &backendConn{br: br}
	if line, err := bc.readLine(); err != nil || line != "* OK first" {
		t.Fatalf("first line = %q, %v", line, err)
	}
	putBackendReader(br)
	bc = &backendConn{br: getBackendReader(strings.NewReader("* OK second\r\n"))}
	defer putBackendReader(bc.br)
	if line, err := bc.readLine(); err != nil || line != "* OK second" {
		t.Fatalf("second connection read %q, %v; want its own greeting", line, err)
	}
	if n := bc.br.Buffered(); n != 0 {
		t.Fatalf("%d bytes buffered after the only line", n)
	}
}

func TestBackendReadLine(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"* OK ready\r\n", "* OK ready"},
		{"* OK ready\n", "* OK ready"},
		{"* 1 FETCH (BODY[] {5}\r\nhello)\r\n", "* 1 FETCH (BODY[] {5})"},
		{"* ID (\"name\" {3}\r\nabc \"x\" {1}\r\ny)\r\n", "* ID (\"name\" {3} \"x\" {1})"},
	} {
		bc := &backendConn{br: getBackendReader(strings.NewReader(tc.in))}
		got, err := bc.readLine()
		putBackendReader(bc.br)
		if err != nil || got != tc.want {
			t.Errorf("readLine(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}
