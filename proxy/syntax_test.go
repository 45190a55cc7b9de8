package proxy

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// rfc2971MaxID is the largest ID command RFC 2971 allows: 30 pairs, keys
// of 30 octets, values of 1,024; with escaped set, every character of
// every string is a quote or a backslash (twice the bytes on the wire).
func rfc2971MaxID(tag string, escaped bool) string {
	var b strings.Builder
	b.WriteString(tag + " ID (")
	for i := 0; i < 30; i++ {
		if i > 0 {
			b.WriteByte(' ')
		}
		k := fmt.Sprintf("x-field-%02d", i) + strings.Repeat("k", 30-len("x-field-00"))
		v := strings.Repeat("v", 1024)
		if escaped {
			k = fmt.Sprintf("x-field-%02d", i) + strings.Repeat(`\"`, 30-len("x-field-00"))
			v = strings.Repeat(`\\`, 1024)
		}
		b.WriteString(`"` + k + `" "` + v + `"`)
	}
	b.WriteString(")\r\n")
	return b.String()
}

// TestRFCSizedCommandsFitDefaults: with the default limits, the largest
// commands the RFCs allow before login get through: RFC 2971's largest ID
// (31,807 bytes; 63.4 KiB escaped), a SASL-IR PLAIN response of RFC 4616's
// largest identities, LOGIN with literals.
func TestRFCSizedCommandsFitDefaults(t *testing.T) {
	h := memHarness(t, nil)
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	plain := rfc2971MaxID("a", false)
	if len(plain) < 31807 {
		t.Fatalf("largest ID is %d bytes, RFC 2971 arithmetic says about 31,807", len(plain))
	}
	c.Send(plain)
	c.Expect("* ID")
	c.Expect("a OK")
	c.Send(rfc2971MaxID("b", true))
	c.Expect("* ID")
	c.Expect("b OK")
	// RFC 4616: authzid, authcid and password of 255 octets each. The
	// server refuses the login (no such user) but reads the command.
	u := strings.Repeat("u", 255)
	ir := b64(u + "\x00" + u + "\x00" + strings.Repeat("p", 255))
	c.Send("c AUTHENTICATE PLAIN " + ir + "\r\n")
	if l, _ := c.Tagged("c"); !strings.HasPrefix(l, "c NO") {
		t.Fatalf("largest PLAIN: %q", l)
	}
	c.Send("d LOGIN {17+}\r\nalice@example.org {9+}\r\nalicepass\r\n")
	c.Expect("d OK")
}

// TestLiteralSyntaxOnTheWire: anything in braces but {digits} or
// {digits+} gets BAD at once, without a continuation, so neither side
// waits for the other; an 8-bit tag gets an untagged BAD.
func TestLiteralSyntaxOnTheWire(t *testing.T) {
	h := memHarness(t, func(o *Options) { o.Limits.MaxBadCommands = 100 })
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	c.C.SetDeadline(time.Now().Add(5 * time.Second)) // a wait would be a failure
	for i, spec := range []string{"+5", "5-", "-5", " 5", "0x5", "5++", "", "+", "4294967296", "5 "} {
		tag := fmt.Sprintf("l%d", i)
		c.Send(tag + " LOGIN alice@example.org {" + spec + "}\r\n")
		c.Expect(tag + " BAD")
	}
	c.Send("\xc3\xa4 NOOP\r\n")
	c.Expect("* BAD")
	c.Send("t+ NOOP\r\n")
	c.Expect("* BAD")
	c.Send("ok NOOP\r\n")
	c.Expect("ok OK")
	c.Send("s LOGIN alice@example.org {9}\r\n")
	c.Expect("+ ")
	c.Send("alicepass\r\n")
	c.Expect("s OK")
}
