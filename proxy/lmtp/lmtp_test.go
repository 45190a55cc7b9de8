package lmtp

import (
	"bufio"
	"bytes"
	"net/netip"
	"strings"
	"testing"
)

func TestReadHeader(t *testing.T) {
	for _, tc := range []struct {
		in       string
		head     string
		received int
	}{
		{"Subject: a\r\n\r\nbody\r\n", "Subject: a\r\n\r\n", 0},
		{"Received: a\r\nreceived: b\r\n\tcont received: c\r\nX: Received: d\r\n\r\nReceived: body\r\n", "Received: a\r\nreceived: b\r\n\tcont received: c\r\nX: Received: d\r\n\r\n", 2},
		{"no blank line", "no blank line", 0},
		{"", "", 0},
	} {
		head, n, err := readHeader(bufio.NewReader(strings.NewReader(tc.in)), maxHeader)
		if err != nil || string(head) != tc.head || n != tc.received {
			t.Errorf("readHeader(%q) = %q, %d, %v; want %q, %d", tc.in, head, n, err, tc.head, tc.received)
		}
	}
	// A header larger than the limit: reading stops near it.
	big := strings.Repeat("X-Long: "+strings.Repeat("y", 990)+"\r\n", 200)
	head, _, err := readHeader(bufio.NewReaderSize(strings.NewReader(big), 4096), 64<<10)
	if err != nil || len(head) < 64<<10 || len(head) > 66<<10 {
		t.Errorf("a 200 KB header: read %d bytes, %v", len(head), err)
	}
}

func FuzzReadHeader(f *testing.F) {
	f.Add([]byte("Received: x\r\n\r\nbody"), 1024)
	f.Add([]byte("a\nb\n\nc"), 4)
	f.Fuzz(func(t *testing.T, in []byte, limit int) {
		if limit <= 0 || limit > 1<<16 {
			return
		}
		head, n, err := readHeader(bufio.NewReaderSize(bytes.NewReader(in), 16), limit)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(in, head) {
			t.Fatalf("head %q is not a prefix of the input", head)
		}
		if n > bytes.Count(head, []byte("\n"))+1 {
			t.Fatalf("%d Received fields in %d lines", n, bytes.Count(head, []byte("\n")))
		}
	})
}

func TestXClient(t *testing.T) {
	cl := client{remote: netip.MustParseAddrPort("[2001:db8::1]:2525"), helo: "mta one+x=y"}
	if got, want := xclient("ADDR PORT HELO TTL", cl), "XCLIENT ADDR=IPV6:2001:db8::1 PORT=2525 HELO=mta+20one+2Bx+3Dy"; got != want {
		t.Errorf("xclient = %q, want %q", got, want)
	}
	if got := xclient("PORT", client{remote: netip.MustParseAddrPort("192.0.2.1:25")}); got != "XCLIENT PORT=25" {
		t.Errorf("only PORT offered: %q", got)
	}
}

func FuzzXtext(f *testing.F) {
	f.Add("mta.example.org")
	f.Add("a+b=c\r\n d")
	f.Fuzz(func(t *testing.T, s string) {
		x := xtext(s)
		for i := 0; i < len(x); i++ {
			if c := x[i]; c < 33 || c > 126 || c == '=' {
				t.Fatalf("xtext(%q) = %q has %q", s, x, c)
			}
		}
	})
}

func TestOKReply(t *testing.T) {
	r := okReply("2.1.5 <alice@example.org> abc Saved")
	if r.Code != 250 || r.EnhancedCode[1] != 1 || r.Message != "abc Saved" {
		t.Errorf("okReply = %+v", r)
	}
}

func TestRoutingUser(t *testing.T) {
	s := &session{srv: &Server{o: Options{RecipientDelimiter: "+"}}}
	for in, want := range map[string]string{
		"Alice+lists@Example.org": "alice@example.org",
		"alice@example.org":       "alice@example.org",
		"+x@example.org":          "+x@example.org", // nothing before the delimiter: kept
		"bob+a+b":                 "bob",
	} {
		if got := s.routingUser(in); got != want {
			t.Errorf("routingUser(%q) = %q, want %q", in, got, want)
		}
	}
	if got := (&session{srv: &Server{}}).routingUser("Alice+x@example.org"); got != "alice+x@example.org" {
		t.Errorf("without a delimiter: %q", got)
	}
}
