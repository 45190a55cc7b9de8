package routing

import (
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/go-ldap/ldap/v3"
)

// FuzzAuthReply: any auth_http reply is an answer with a dialable
// address, a refusal, or an error; never a panic, never a port out of
// range, never a host that could smuggle a path or credentials.
func FuzzAuthReply(f *testing.F) {
	for _, s := range [][4]string{
		{"OK", "10.0.0.1", "143", ""},
		{"OK", "mail.example.org", "", ""},
		{"OK", "[::1]:993", "", ""},
		{"OK", "", "143", ""},
		{"OK", "10.0.0.1", "99999", ""},
		{"Invalid login or password", "", "", "3"},
		{"", "", "", ""},
		{"OK", "a b/c@d", "1", "x"},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	d := newDirectory("fuzz", DirectoryOptions{})
	f.Fuzz(func(t *testing.T, status, server, port, wait string) {
		h := http.Header{}
		h.Set("Auth-Status", status)
		h.Set("Auth-Server", server)
		h.Set("Auth-Port", port)
		h.Set("Auth-Wait", wait)
		host, p, err := parseAuthReply(h, "fuzz")
		var r *RefusedError
		if errors.As(err, &r) {
			if r.Wait < 0 || r.Wait > 30e9 {
				t.Fatalf("wait %v", r.Wait)
			}
			return
		}
		if err != nil {
			return
		}
		if p < 0 || p > 65535 {
			t.Fatalf("port %d", p)
		}
		b, err := d.backend(host, p)
		if err != nil {
			return
		}
		h2, p2, err := net.SplitHostPort(b.Addr)
		if err != nil || h2 == "" || p2 == "0" || strings.ContainsAny(b.Addr, " /\\@") {
			t.Fatalf("backend address %q from server %q port %q", b.Addr, server, port)
		}
	})
}

// FuzzExpandFilter: whatever the user name, the expanded filter compiles
// and has the template's shape, with the name as the value: no filter
// injection.
func FuzzExpandFilter(f *testing.F) {
	for _, u := range []string{"alice@example.org", "*", "x)(uid=*", `a\b`, "a(b)c@d", "\x00", "ünï@cödé"} {
		f.Add(u)
	}
	const tmpl = "(&(objectClass=inetOrgPerson)(mail=%u))"
	f.Fuzz(func(t *testing.T, user string) {
		if !utf8.ValidString(user) {
			return // the proxy refuses such names before routing
		}
		p, err := ldap.CompileFilter(expandFilter(tmpl, user))
		if err != nil {
			t.Fatalf("user %q: %v", user, err)
		}
		if p.Tag != ldap.FilterAnd || len(p.Children) != 2 {
			t.Fatalf("user %q changed the filter's shape", user)
		}
		eq := p.Children[1]
		if eq.Tag != ldap.FilterEqualityMatch || len(eq.Children) != 2 {
			t.Fatalf("user %q: second clause is not an equality", user)
		}
		if got := eq.Children[1].Data.String(); got != user {
			t.Fatalf("user %q became value %q", user, got)
		}
	})
}
