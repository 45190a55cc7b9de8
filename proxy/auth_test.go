package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"github.com/imapgate/imapgate/internal/testenv"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imapgate/imapgate/routing"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestAuthenticateLogin(t *testing.T) {
	h := memHarness(t, nil)
	for _, ir := range []bool{false, true} {
		t.Run(fmt.Sprintf("sasl-ir=%v", ir), func(t *testing.T) {
			c := dialConv(t, h.tlsAddr, h.clientTLS)
			g := c.Expect("* OK")
			if !strings.Contains(g, "AUTH=LOGIN") {
				t.Fatalf("greeting %q lacks AUTH=LOGIN", g)
			}
			if ir {
				c.Send("a AUTHENTICATE LOGIN " + b64("bob@example.org") + "\r\n")
			} else {
				c.Send("a AUTHENTICATE LOGIN\r\n")
				c.Expect("+ VXNlcm5hbWU6")
				c.Send(b64("bob@example.org") + "\r\n")
			}
			c.Expect("+ UGFzc3dvcmQ6")
			c.Send(b64("bob pass") + "\r\n")
			c.Expect("a OK [CAPABILITY")
		})
	}
}

func TestOAuthNotOfferedByDefault(t *testing.T) {
	h := memHarness(t, nil)
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	if g := c.Expect("* OK"); strings.Contains(g, "XOAUTH2") {
		t.Fatalf("greeting %q offers XOAUTH2 though it was not configured", g)
	}
	c.Send("a AUTHENTICATE XOAUTH2 " + b64("user=alice@example.org\x01auth=Bearer x\x01\x01") + "\r\n")
	c.Expect("a NO [CANNOT]")
}

func TestOAuthBadResponses(t *testing.T) {
	h := memHarness(t, func(o *Options) {
		o.Capabilities.AuthMechanisms = []string{"PLAIN", "XOAUTH2", "OAUTHBEARER"}
	})
	for name, cmd := range map[string]string{
		"xoauth2 without user":         "AUTHENTICATE XOAUTH2 " + b64("auth=Bearer x\x01\x01"),
		"xoauth2 without token":        "AUTHENTICATE XOAUTH2 " + b64("user=alice@example.org\x01\x01"),
		"oauthbearer without authzid":  "AUTHENTICATE OAUTHBEARER " + b64("n,,\x01auth=Bearer x\x01\x01"),
		"oauthbearer channel binding":  "AUTHENTICATE OAUTHBEARER " + b64("p=tls-unique,a=alice,\x01auth=Bearer x\x01\x01"),
		"CR in token":                  "AUTHENTICATE XOAUTH2 " + b64("user=alice\x01auth=Bearer x\r\ny\x01\x01"),
		"invalid base64":               "AUTHENTICATE XOAUTH2 %%%",
		"NUL in PLAIN password":        "AUTHENTICATE PLAIN " + b64("\x00alice@example.org\x00pa\x00ss"),
		"LF in LOGIN password literal": "LOGIN alice@example.org {5+}\r\npa\nss",
	} {
		t.Run(name, func(t *testing.T) {
			c := dialConv(t, h.tlsAddr, h.clientTLS)
			c.Expect("* OK")
			c.Send("a " + cmd + "\r\n")
			l := c.Expect("a ")
			if !strings.HasPrefix(l, "a BAD") {
				t.Fatalf("got %q, want BAD", l)
			}
			// The session goes on.
			c.Send("b NOOP\r\n")
			c.Expect("b OK")
		})
	}
}

func TestProxyProtocolFromLoadBalancer(t *testing.T) {
	addr := startMemBackend(t)
	for _, tt := range []struct {
		name    string
		trusted string
		header  string
		client  string // the address imapgate should believe; "" = refused
	}{
		{"v1 from trusted", "127.0.0.0/8", "PROXY TCP4 203.0.113.7 192.0.2.1 40000 993\r\n", "203.0.113.7:40000"},
		{"v2 from trusted", "127.0.0.0/8", string(proxyV2(t, "[2001:db8::7]:40001", "[2001:db8::1]:993")), "[2001:db8::7]:40001"},
		{"missing from trusted", "127.0.0.0/8", "a NOOP\r\n", ""},
		{"claimed by untrusted", "10.0.0.0/8", "PROXY TCP4 203.0.113.7 192.0.2.1 40000 993\r\n", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			lb := netip.MustParsePrefix(tt.trusted)
			h := newHarnessListeners(t, fixedRouter(&routing.Backend{ID: "mem1", Addr: addr}), nil, Listener{Mode: StartTLS, ProxyProtocolFrom: []netip.Prefix{lb}})
			c := dialConv(t, h.startTLSAddr, nil)
			if lb.Contains(netip.MustParseAddr("127.0.0.1")) {
				c.Send(tt.header)
				if tt.client == "" {
					c.ExpectClosed("* BYE")
					return
				}
				c.Expect("* OK")
				testenv.WaitFor(t, func() bool { return len(h.srv.Sessions("", "")) == 1 })
				if got := h.srv.Sessions("", "")[0].Client; got != tt.client {
					t.Fatalf("session client = %s, want %s", got, tt.client)
				}
				return
			}
			c.Expect("* OK")
			c.Send(tt.header)
			c.Expect("* BYE")
			c.ExpectClosed("* BYE")
		})
	}
}

func proxyV2(t *testing.T, src, dst string) []byte {
	var b strings.Builder
	if err := writeProxyHeader(&b, 2, netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)); err != nil {
		t.Fatal(err)
	}
	return []byte(b.String())
}

func TestReadProxyHeaderBounds(t *testing.T) {
	for name, in := range map[string]string{
		"v1 too long":  "PROXY TCP4 " + strings.Repeat("1", 200) + "\r\n",
		"v2 too long":  string(proxyV2Sig) + "\x21\x11\xff\xff",
		"garbage":      "GET / HTTP/1.1\r\n\r\n",
		"truncated v2": string(proxyV2Sig[:10]),
	} {
		t.Run(name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			go func() {
				b.Write([]byte(in))
				b.Close()
			}()
			a.SetDeadline(time.Now().Add(5 * time.Second))
			if _, _, _, err := readProxyHeader(a); err == nil {
				t.Fatal("accepted a broken header")
			}
		})
	}
}

func FuzzReadProxyHeader(f *testing.F) {
	f.Add([]byte("PROXY TCP4 203.0.113.7 192.0.2.1 40000 993\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add(append(append([]byte{}, proxyV2Sig...), 0x21, 0x11, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		defer a.Close()
		go func() {
			b.Write(in)
			b.Close()
		}()
		readProxyHeader(a) // must return, bounded, without panicking
	})
}

// countingRouter counts how often the backend is asked.
type countingRouter struct {
	b *routing.Backend
	n atomic.Int64
}

func (r *countingRouter) Route(context.Context, string) (*routing.Backend, error) {
	r.n.Add(1)
	return r.b, nil
}

// TestPasswordSpray fails logins from many loopback addresses against many
// users: each network is cut off after its burst without the backend being
// asked (the user buckets only slow, see limits_test.go), the limiter's
// memory stays bounded, and a real user from a fresh address still gets in.
func TestPasswordSpray(t *testing.T) {
	addr := startMemBackend(t)
	r := &countingRouter{b: &routing.Backend{ID: "mem1", Addr: addr}}
	h := newHarnessListeners(t, r, func(o *Options) {
		o.Limits.IPFailures = RateLimit{Burst: 2, Refill: time.Hour}
		o.Limits.UserFailures = RateLimit{Burst: 20, Refill: time.Hour}
		o.Limits.FailureKeys = 200
		o.Limits.MaxAuthFailures = 100
	}, Listener{Mode: StartTLS, InsecureAuth: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})

	const ips, perIP = 300, 4
	limited := 0
	for i := 0; i < ips; i++ {
		local := &net.TCPAddr{IP: net.IPv4(127, 1, byte(i/250), byte(1+i%250))}
		conn, err := (&net.Dialer{LocalAddr: local}).Dial("tcp", h.startTLSAddr)
		if err != nil {
			t.Fatal(err)
		}
		c := &conv{T: t, C: conn, R: bufioReader(conn)}
		c.Expect("* OK")
		for j := 0; j < perIP; j++ {
			c.Send(fmt.Sprintf("a%d LOGIN victim%d@example.org wrong\r\n", j, (i*perIP+j)%50))
			l, _ := c.Tagged(fmt.Sprintf("a%d", j))
			switch {
			case strings.HasPrefix(l, fmt.Sprintf("a%d NO [LIMIT]", j)):
				limited++
			case !strings.HasPrefix(l, fmt.Sprintf("a%d NO [AUTHENTICATIONFAILED]", j)):
				t.Fatalf("spray login answered %q", l)
			}
		}
		conn.Close()
	}
	total := ips * perIP
	asked := int(r.n.Load())
	t.Logf("%d failed logins: %d refused by the limiter, %d reached the backend", total, limited, asked)
	if limited < total/2 || asked+limited != total {
		t.Errorf("limiter refused %d of %d, backend asked %d times", limited, total, asked)
	}
	if n := h.srv.limiters.Load().ip.size(); n > 200 {
		t.Errorf("IP limiter tracks %d keys, bound is 200", n)
	}
	if n := h.srv.limiters.Load().user.size(); n > 200 {
		t.Errorf("user limiter tracks %d keys, bound is 200", n)
	}
	// A legitimate user from a fresh address is unaffected.
	c := testenv.DialConvFrom(t, h.startTLSAddr, net.IPv4(127, 9, 9, 9), nil)
	c.Expect("* OK")
	c.Send("a LOGIN alice@example.org alicepass\r\n")
	c.Expect("a OK")
}

func TestFailureLimiterBounded(t *testing.T) {
	l := newFailureLimiter(1, time.Hour, 100)
	now := time.Now()
	for i := 0; i < 10000; i++ {
		failNow(l, fmt.Sprint(i), now)
		if n := l.size(); n > 100 {
			t.Fatalf("after %d keys the limiter holds %d, bound 100", i+1, n)
		}
	}
	if failNow(l, "9999", now) {
		t.Error("a key over its burst has a token")
	}
	if !failNow(l, "never-failed", now) {
		t.Error("a fresh key is refused")
	}
	var nilLimiter *failureLimiter
	if b, _, ok := nilLimiter.reserve("x", now); !ok {
		t.Error("a disabled limiter refuses")
	} else {
		nilLimiter.settle(b, now, true)
	}
}

type fixedVerifier map[string]string

func (v fixedVerifier) VerifyPassword(_ context.Context, user, pass string) error {
	if p, ok := v[user]; ok && p == pass {
		return nil
	}
	return fmt.Errorf("%w for %s", ErrBadPassword, user)
}

var _ = errors.Is
