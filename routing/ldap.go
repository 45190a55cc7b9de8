package routing

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-ldap/ldap/v3"
)

// LDAPConfig configures an LDAP router: the backend host of each user is
// an attribute of their directory entry, as in Dovecot's proxy setup
// (passdb ldap with pass_attrs "mailHost=host"). The zero value is not
// usable: URL, BaseDN, Filter and HostAttribute are required.
type LDAPConfig struct {
	// URL is the server: ldap://host[:389] or ldaps://host[:636].
	URL string
	// StartTLS upgrades an ldap:// connection before binding.
	StartTLS bool
	// TLS is the client config for ldaps:// and StartTLS; nil means the
	// system roots and the URL's host as server name.
	TLS *tls.Config
	// BindDN and BindPassword authenticate imapgate; an empty BindDN
	// searches anonymously.
	BindDN, BindPassword string
	// BaseDN is where the search starts (whole subtree).
	BaseDN string
	// Filter is the search filter with Dovecot's variables: %u the user,
	// %n its local part, %d its domain, %% a percent sign; each value is
	// escaped for the filter (RFC 4515). Example:
	// "(&(objectClass=inetOrgPerson)(mail=%u))".
	Filter string
	// HostAttribute holds the backend's host, or host:port, or the ID of a
	// configured backend. PortAttribute, if set, holds its port.
	HostAttribute, PortAttribute string
	// Timeout bounds one lookup, dial and bind included. Zero means 5
	// seconds.
	Timeout time.Duration
	// PoolSize is how many idle bound connections are kept for reuse.
	// Zero means 4; at most that many lookups run at once beyond which a
	// lookup opens a connection of its own and closes it after.
	PoolSize int
	// Directory is the cache, the backends' defaults and the evictor.
	Directory DirectoryOptions
}

// LDAP is the LDAP router. Per lookup it searches BaseDN's subtree with
// the filter for at most two entries and reads the host (and port)
// attribute of the one it finds. No entry, or an entry without the host
// attribute, is a refusal (cached for NegativeTTL); two entries, or a
// server that does not answer, is an error (not cached).
type LDAP struct {
	cfg  LDAPConfig
	d    *directory
	pool chan *ldap.Conn
	host string // the URL's host name, for StartTLS's server name
	desc string
}

var _ Router = (*LDAP)(nil)

// NewLDAP checks cfg and returns the router. It connects on the first
// lookup.
func NewLDAP(cfg LDAPConfig) (*LDAP, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || (u.Scheme != "ldap" && u.Scheme != "ldaps") || u.Host == "" {
		return nil, fmt.Errorf("routing: ldap router: url %q: want ldap://host[:port] or ldaps://host[:port]", cfg.URL)
	}
	if cfg.StartTLS && u.Scheme == "ldaps" {
		return nil, errors.New("routing: ldap router: start_tls with an ldaps:// url (it is TLS already)")
	}
	switch {
	case cfg.BaseDN == "":
		return nil, errors.New("routing: ldap router: base_dn is required")
	case cfg.HostAttribute == "":
		return nil, errors.New("routing: ldap router: host_attribute is required")
	case !strings.Contains(cfg.Filter, "%u") && !strings.Contains(cfg.Filter, "%n"):
		return nil, fmt.Errorf("routing: ldap router: filter %q uses neither %%u nor %%n: every user would get the same entry", cfg.Filter)
	}
	if _, err := ldap.CompileFilter(expandFilter(cfg.Filter, "user@example.org")); err != nil {
		return nil, fmt.Errorf("routing: ldap router: filter %q: %w", cfg.Filter, err)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.PoolSize <= 0 {
		cfg.PoolSize = 4
	}
	return &LDAP{
		cfg:  cfg,
		d:    newDirectory("ldap", cfg.Directory),
		pool: make(chan *ldap.Conn, cfg.PoolSize),
		host: u.Hostname(),
		desc: u.Scheme + "://" + u.Host,
	}, nil
}

// expandFilter fills in Dovecot's %u, %n, %d and %% for user.
func expandFilter(tmpl, user string) string {
	local, domain := user, ""
	if i := strings.LastIndexByte(user, '@'); i >= 0 {
		local, domain = user[:i], user[i+1:]
	}
	var b strings.Builder
	for i := 0; i < len(tmpl); i++ {
		if tmpl[i] != '%' || i+1 == len(tmpl) {
			b.WriteByte(tmpl[i])
			continue
		}
		i++
		switch tmpl[i] {
		case 'u':
			b.WriteString(ldap.EscapeFilter(user))
		case 'n':
			b.WriteString(ldap.EscapeFilter(local))
		case 'd':
			b.WriteString(ldap.EscapeFilter(domain))
		case '%':
			b.WriteByte('%')
		default:
			b.WriteByte('%')
			b.WriteByte(tmpl[i])
		}
	}
	return b.String()
}

// Route looks user up, through the cache.
func (l *LDAP) Route(ctx context.Context, user string) (*Backend, error) {
	user = NormalizeUser(user)
	if b, ok, err := l.d.cached(user); ok {
		return b, err
	}
	return l.route(ctx, user)
}

func (l *LDAP) route(ctx context.Context, user string) (*Backend, error) {
	return l.d.route(ctx, user, user, func(ctx context.Context) (string, int, error) {
		return l.lookup(ctx, user)
	})
}

func (l *LDAP) lookup(ctx context.Context, user string) (string, int, error) {
	deadline := time.Now().Add(l.cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	// A pooled connection may have been closed by the server since: one
	// more try, on a fresh connection, when the first fails on the wire.
	for try := 0; ; try++ {
		c, pooled, err := l.get(deadline)
		if err != nil {
			return "", 0, err
		}
		host, port, err := l.search(c, user, deadline)
		if err != nil && ldap.IsErrorWithCode(err, ldap.ErrorNetwork) {
			c.Close()
			if pooled && try == 0 {
				continue
			}
			return "", 0, fmt.Errorf("%s: %w", l.desc, err)
		}
		l.put(c)
		return host, port, err
	}
}

func (l *LDAP) search(c *ldap.Conn, user string, deadline time.Time) (string, int, error) {
	c.SetTimeout(time.Until(deadline))
	attrs := []string{l.cfg.HostAttribute}
	if l.cfg.PortAttribute != "" {
		attrs = append(attrs, l.cfg.PortAttribute)
	}
	tl := max(int(time.Until(deadline)/time.Second), 1)
	req := ldap.NewSearchRequest(l.cfg.BaseDN, ldap.ScopeWholeSubtree, ldap.NeverDerefAliases, 2, tl, false,
		expandFilter(l.cfg.Filter, user), attrs, nil)
	res, err := c.Search(req)
	switch {
	case ldap.IsErrorWithCode(err, ldap.LDAPResultSizeLimitExceeded):
		return "", 0, fmt.Errorf("%s: more than one entry for %q (make the filter unique)", l.desc, user)
	case ldap.IsErrorWithCode(err, ldap.LDAPResultNoSuchObject):
		return "", 0, fmt.Errorf("%s: base_dn %q does not exist", l.desc, l.cfg.BaseDN)
	case err != nil:
		return "", 0, err
	case len(res.Entries) == 0:
		return "", 0, &RefusedError{Reason: "no directory entry"}
	case len(res.Entries) > 1:
		return "", 0, fmt.Errorf("%s: more than one entry for %q (make the filter unique)", l.desc, user)
	}
	e := res.Entries[0]
	host := e.GetAttributeValue(l.cfg.HostAttribute)
	if host == "" {
		return "", 0, &RefusedError{Reason: "entry " + e.DN + " has no " + l.cfg.HostAttribute}
	}
	port := 0
	if l.cfg.PortAttribute != "" {
		if p := e.GetAttributeValue(l.cfg.PortAttribute); p != "" {
			if port, err = strconv.Atoi(strings.TrimSpace(p)); err != nil || port <= 0 || port > 65535 {
				return "", 0, fmt.Errorf("%s: entry %s: bad %s %q", l.desc, e.DN, l.cfg.PortAttribute, p)
			}
		}
	}
	return host, port, nil
}

// get returns an idle pooled connection, or a new bound one.
func (l *LDAP) get(deadline time.Time) (*ldap.Conn, bool, error) {
	for {
		select {
		case c := <-l.pool:
			if c.IsClosing() {
				c.Close()
				continue
			}
			return c, true, nil
		default:
		}
		break
	}
	d := &net.Dialer{Deadline: deadline}
	c, err := ldap.DialURL(l.cfg.URL, ldap.DialWithDialer(d), ldap.DialWithTLSConfig(l.cfg.TLS))
	if err != nil {
		return nil, false, fmt.Errorf("%s: %w", l.desc, err)
	}
	c.SetTimeout(time.Until(deadline))
	if l.cfg.StartTLS {
		tc := &tls.Config{}
		if l.cfg.TLS != nil {
			tc = l.cfg.TLS.Clone()
		}
		if tc.ServerName == "" {
			tc.ServerName = l.host
		}
		if err := c.StartTLS(tc); err != nil {
			c.Close()
			return nil, false, fmt.Errorf("%s: StartTLS: %w", l.desc, err)
		}
	}
	if l.cfg.BindDN != "" {
		if err := c.Bind(l.cfg.BindDN, l.cfg.BindPassword); err != nil {
			c.Close()
			// The server's answer names the DN, never the password.
			return nil, false, fmt.Errorf("%s: bind as %s: %w", l.desc, l.cfg.BindDN, err)
		}
	}
	return c, false, nil
}

// put keeps c for the next lookup, or closes it when the pool is full.
func (l *LDAP) put(c *ldap.Conn) {
	select {
	case l.pool <- c:
	default:
		c.Close()
	}
}

// Stats counts lookups, cache hits, refusals and evictions.
func (l *LDAP) Stats() DirectoryStats { return l.d.stats() }

// Forget drops user's cached answer: the next login asks the directory.
func (l *LDAP) Forget(user string) { l.d.forget(NormalizeUser(user)) }

// Close closes the pooled connections.
func (l *LDAP) Close() {
	for {
		select {
		case c := <-l.pool:
			c.Close()
		default:
			return
		}
	}
}

// String describes l for logs.
func (l *LDAP) String() string {
	return fmt.Sprintf("ldap(%s %s, cache %v/%v)", l.desc, l.cfg.BaseDN, l.d.o.TTL, l.d.o.NegativeTTL)
}
