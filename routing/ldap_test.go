package routing

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"

	"github.com/imapgate/imapgate/internal/testenv"
)

const ldapUsersLDIF = `dn: uid=port,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: port
cn: port
sn: port
mail: port@example.org
mailHost: 10.0.0.5
employeeNumber: 1143

dn: uid=dup1,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: dup1
cn: dup
sn: dup
mail: dup@example.org

dn: uid=dup2,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: dup2
cn: dup
sn: dup
mail: dup@example.org
`

func startTestSlapd(t *testing.T) *testenv.Slapd {
	return testenv.StartSlapd(t, testenv.SlapdOptions{
		Users: map[string]string{
			"alice@example.org":  "10.0.0.1",
			"bob@example.org":    "10.0.0.2:1143",
			"carol@example.org":  "dovecot1",
			"nohost@example.org": "",
		},
		LDIF: ldapUsersLDIF,
	})
}

func newTestLDAP(t *testing.T, s *testenv.Slapd, cfg LDAPConfig) *LDAP {
	t.Helper()
	if cfg.URL == "" {
		cfg.URL = s.URL
	}
	if cfg.BindDN == "" {
		cfg.BindDN, cfg.BindPassword = s.BindDN, s.BindPassword
	}
	cfg.BaseDN = s.BaseDN
	if cfg.Filter == "" {
		cfg.Filter = "(&(objectClass=inetOrgPerson)(mail=%u))"
	}
	cfg.HostAttribute = "mailHost"
	l, err := NewLDAP(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

func TestLDAPRouterAnswers(t *testing.T) {
	s := startTestSlapd(t)
	known := &Backend{ID: "dovecot1", Addr: "10.0.0.9:143"}
	l := newTestLDAP(t, s, LDAPConfig{PortAttribute: "employeeNumber", Directory: DirectoryOptions{Known: []*Backend{known}}})
	ctx := context.Background()
	for _, tc := range []struct {
		user, addr string
		refused    bool
		fails      bool
	}{
		{user: "Alice@example.org", addr: "10.0.0.1:143"},
		{user: "bob@example.org", addr: "10.0.0.2:1143"},
		{user: "carol@example.org", addr: "10.0.0.9:143"}, // the ID of a configured backend
		{user: "port@example.org", addr: "10.0.0.5:1143"},
		{user: "nohost@example.org", refused: true},
		{user: "nobody@example.org", refused: true},
		{user: "*", refused: true},                         // escaped: not a wildcard
		{user: "x)(mail=alice@example.org", refused: true}, // no filter injection
		{user: "dup@example.org", fails: true},
	} {
		b, err := l.Route(ctx, tc.user)
		var r *RefusedError
		switch {
		case tc.refused:
			if !errors.As(err, &r) || !errors.Is(err, ErrNoBackend) {
				t.Errorf("%s: %v, %v; want a refusal", tc.user, b, err)
			}
		case tc.fails:
			if err == nil || errors.As(err, &r) || !errors.Is(err, ErrNoBackend) {
				t.Errorf("%s: %v, %v; want an ErrNoBackend that is not a refusal", tc.user, b, err)
			}
		case err != nil:
			t.Errorf("%s: %v", tc.user, err)
		case b.Addr != tc.addr:
			t.Errorf("%s: %s, want %s", tc.user, b.Addr, tc.addr)
		}
	}
	if b, _ := l.Route(ctx, "carol@example.org"); b != known {
		t.Errorf("carol: %+v, want the configured backend", b)
	}
}

func TestLDAPRouterTLS(t *testing.T) {
	s := startTestSlapd(t)
	trusted := &tls.Config{RootCAs: s.CA.Pool}
	other := &tls.Config{RootCAs: testenv.NewTestCA(t).Pool}
	for _, tc := range []struct {
		name     string
		url      string
		startTLS bool
		tls      *tls.Config
		ok       bool
	}{
		{"ldaps", s.LDAPS, false, trusted, true},
		{"starttls", s.URL, true, trusted, true},
		{"ldaps, untrusted CA", s.LDAPS, false, other, false},
		{"starttls, untrusted CA", s.URL, true, other, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLDAP(t, s, LDAPConfig{URL: tc.url, StartTLS: tc.startTLS, TLS: tc.tls})
			b, err := l.Route(context.Background(), "alice@example.org")
			if tc.ok && (err != nil || b.Addr != "10.0.0.1:143") {
				t.Fatalf("%v, %v", b, err)
			}
			var r *RefusedError
			if !tc.ok && (err == nil || errors.As(err, &r)) {
				t.Fatalf("%v, %v; want a TLS error", b, err)
			}
		})
	}
}

func TestLDAPRouterBindFails(t *testing.T) {
	s := startTestSlapd(t)
	l := newTestLDAP(t, s, LDAPConfig{BindDN: s.BindDN, BindPassword: "wrong"})
	_, err := l.Route(context.Background(), "alice@example.org")
	var r *RefusedError
	if err == nil || errors.As(err, &r) || !errors.Is(err, ErrNoBackend) {
		t.Fatalf("wrong bind password: %v; want an error that is not a refusal", err)
	}
	if s := err.Error(); strings.Contains(s, "wrong") {
		t.Errorf("the error shows the bind password: %s", s)
	}
}

// Connections are kept and reused; one the server closed is replaced.
func TestLDAPRouterPool(t *testing.T) {
	s := startTestSlapd(t)
	l := newTestLDAP(t, s, LDAPConfig{PoolSize: 1, Directory: DirectoryOptions{TTL: -1, NegativeTTL: -1}})
	ctx := context.Background()
	for range 3 {
		if _, err := l.Route(ctx, "alice@example.org"); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(l.pool); n != 1 {
		t.Fatalf("%d pooled connections, want 1", n)
	}
	c := <-l.pool
	c.Close() // as if the server had closed it
	l.pool <- c
	if b, err := l.Route(ctx, "alice@example.org"); err != nil || b.Addr != "10.0.0.1:143" {
		t.Fatalf("after the pooled connection closed: %v, %v", b, err)
	}
}

// A move is a change in the directory: the next lookup (past the TTL)
// names the new backend and evicts the sessions on the old one.
func TestLDAPRouterMove(t *testing.T) {
	s := startTestSlapd(t)
	ev := &recordingEvictor{}
	l := newTestLDAP(t, s, LDAPConfig{Directory: DirectoryOptions{TTL: -1, Evictor: ev}})
	ctx := context.Background()
	if b, err := l.Route(ctx, "alice@example.org"); err != nil || b.Addr != "10.0.0.1:143" {
		t.Fatal(b, err)
	}
	s.Modify(t, "dn: uid=alice,ou=people,dc=example,dc=org\nchangetype: modify\nreplace: mailHost\nmailHost: 10.0.0.7\n")
	if b, err := l.Route(ctx, "alice@example.org"); err != nil || b.Addr != "10.0.0.7:143" {
		t.Fatal(b, err)
	}
	if last := ev.calls[len(ev.calls)-1]; last != "alice@example.org->10.0.0.7:143" {
		t.Errorf("evictor calls %q", ev.calls)
	}
}

func TestLDAPRouterConfig(t *testing.T) {
	base := LDAPConfig{URL: "ldap://127.0.0.1", BaseDN: "dc=x", Filter: "(mail=%u)", HostAttribute: "mailHost"}
	for name, mod := range map[string]func(*LDAPConfig){
		"bad scheme":          func(c *LDAPConfig) { c.URL = "http://x" },
		"starttls over ldaps": func(c *LDAPConfig) { c.URL, c.StartTLS = "ldaps://x", true },
		"no base":             func(c *LDAPConfig) { c.BaseDN = "" },
		"no host attribute":   func(c *LDAPConfig) { c.HostAttribute = "" },
		"filter without user": func(c *LDAPConfig) { c.Filter = "(objectClass=*)" },
		"unbalanced filter":   func(c *LDAPConfig) { c.Filter = "(mail=%u" },
	} {
		c := base
		mod(&c)
		if _, err := NewLDAP(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := NewLDAP(base); err != nil {
		t.Errorf("valid config: %v", err)
	}
	for tmpl, want := range map[string]string{
		"(mail=%u)":              `(mail=a\2a\28b\29@x.org)`,
		"(&(uid=%n)(dc=%d))":     `(&(uid=a\2a\28b\29)(dc=x.org))`,
		"(mail=%u)(x=100%%)(%z)": `(mail=a\2a\28b\29@x.org)(x=100%)(%z)`,
	} {
		if got := expandFilter(tmpl, "a*(b)@x.org"); got != want {
			t.Errorf("expandFilter(%q) = %q, want %q", tmpl, got, want)
		}
	}
}
