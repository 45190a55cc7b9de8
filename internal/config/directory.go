package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"slices"
	"strings"

	"github.com/imapgate/imapgate/routing"
)

// RoutingHTTP is [routing.http]: the auth_http router (nginx's protocol).
type RoutingHTTP struct {
	URL          string   `toml:"url"`
	Timeout      Duration `toml:"timeout"`       // default 5s
	SendPassword bool     `toml:"send_password"` // default false: the backend checks the password
	Headers      []string `toml:"headers"`       // "Name: value", nginx's auth_http_header
	CAFile       string   `toml:"ca_file"`       // for an https url; default system roots
}

// RoutingLDAP is [routing.ldap]: the LDAP router (Dovecot proxy's setup).
type RoutingLDAP struct {
	URL              string   `toml:"url"` // ldap://host:389 or ldaps://host:636
	StartTLS         bool     `toml:"start_tls"`
	CAFile           string   `toml:"ca_file"`
	BindDN           string   `toml:"bind_dn"`
	BindPasswordFile string   `toml:"bind_password_file"`
	BaseDN           string   `toml:"base_dn"`
	Filter           string   `toml:"filter"`         // %u, %n, %d as in Dovecot
	HostAttribute    string   `toml:"host_attribute"` // default "mailHost"
	PortAttribute    string   `toml:"port_attribute"`
	Timeout          Duration `toml:"timeout"`   // default 5s
	PoolSize         int      `toml:"pool_size"` // default 4
}

// RoutingDirectory is [routing.directory]: what the http and ldap routers
// share.
type RoutingDirectory struct {
	CacheTTL    Duration `toml:"cache_ttl"`    // default 1m: how soon a directory change applies
	NegativeTTL Duration `toml:"negative_ttl"` // default 10s
	CacheSize   int      `toml:"cache_size"`   // default 10000
	DefaultPort int      `toml:"default_port"` // default 143
	Security    string   `toml:"security"`     // none (default), tls, starttls
}

// IsDirectoryRouter reports whether routing.router is "http" or "ldap".
func (c *Config) IsDirectoryRouter() bool { return c.Routing.Router.Directory() }

// DirectoryOptions builds the options the http and ldap routers share.
// The Evictor and Logger are the caller's to set. [backends], optional
// here, are the known backends: an answer naming one's address or name
// gets its security and TLS settings.
func (c *Config) DirectoryOptions() (routing.DirectoryOptions, error) {
	d := c.Routing.Directory
	sec, err := routing.ParseSecurity(d.Security)
	if err != nil {
		return routing.DirectoryOptions{}, fmt.Errorf("routing.directory.security: %w", err)
	}
	if d.DefaultPort < 0 || d.DefaultPort > 65535 {
		return routing.DirectoryOptions{}, fmt.Errorf("routing.directory.default_port %d: out of range", d.DefaultPort)
	}
	o := routing.DirectoryOptions{TTL: d.CacheTTL.D(), NegativeTTL: d.NegativeTTL.D(), CacheSize: d.CacheSize, DefaultPort: d.DefaultPort, Security: sec}
	if o.TLS, err = c.BackendTLS(); err != nil {
		return o, err
	}
	if len(c.Backends) > 0 {
		sc, err := c.StaticConfig()
		if err != nil {
			return o, err
		}
		for _, id := range slices.Sorted(maps.Keys(sc.Backends)) {
			o.Known = append(o.Known, sc.Backends[id])
		}
	}
	return o, nil
}

// HTTPRouterConfig builds [routing.http] for routing.NewHTTP.
func (c *Config) HTTPRouterConfig() (routing.HTTPConfig, error) {
	h := c.Routing.HTTP
	if h.URL == "" {
		return routing.HTTPConfig{}, errors.New(`routing.http.url is required with routing.router = "http"`)
	}
	dir, err := c.DirectoryOptions()
	if err != nil {
		return routing.HTTPConfig{}, err
	}
	hc := routing.HTTPConfig{URL: h.URL, Timeout: h.Timeout.D(), SendPassword: h.SendPassword, Directory: dir}
	if len(h.Headers) > 0 {
		hc.Header = http.Header{}
		for _, line := range h.Headers {
			k, v, ok := strings.Cut(line, ":")
			if k = strings.TrimSpace(k); !ok || k == "" || strings.ContainsAny(k, " \t") {
				return hc, fmt.Errorf("routing.http.headers: %q: want \"Name: value\"", line)
			}
			hc.Header.Add(k, strings.TrimSpace(v))
		}
	}
	if hc.TLS, err = caConfig(h.CAFile, "routing.http.ca_file"); err != nil {
		return hc, err
	}
	// NewHTTP checks the URL.
	if _, err := routing.NewHTTP(hc); err != nil {
		return hc, err
	}
	return hc, nil
}

// LDAPRouterConfig builds [routing.ldap] for routing.NewLDAP, reading the
// bind password file.
func (c *Config) LDAPRouterConfig() (routing.LDAPConfig, error) {
	l := c.Routing.LDAP
	dir, err := c.DirectoryOptions()
	if err != nil {
		return routing.LDAPConfig{}, err
	}
	lc := routing.LDAPConfig{
		URL: l.URL, StartTLS: l.StartTLS, BindDN: l.BindDN, BaseDN: l.BaseDN, Filter: l.Filter,
		HostAttribute: l.HostAttribute, PortAttribute: l.PortAttribute, Timeout: l.Timeout.D(), PoolSize: l.PoolSize,
		Directory: dir,
	}
	if lc.HostAttribute == "" {
		lc.HostAttribute = "mailHost"
	}
	if l.BindPasswordFile != "" {
		if l.BindDN == "" {
			return lc, errors.New("routing.ldap.bind_password_file without bind_dn")
		}
		b, err := os.ReadFile(l.BindPasswordFile)
		if err != nil {
			return lc, fmt.Errorf("routing.ldap.bind_password_file: %w", err)
		}
		lc.BindPassword = strings.TrimRight(string(b), "\r\n")
	}
	if lc.TLS, err = caConfig(l.CAFile, "routing.ldap.ca_file"); err != nil {
		return lc, err
	}
	if _, err := routing.NewLDAP(lc); err != nil {
		return lc, err
	}
	return lc, nil
}

// caConfig is a client TLS config trusting the CAs in file, or nil.
func caConfig(file, key string) (*tls.Config, error) {
	if file == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s %s: no PEM certificates", key, file)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// validateDirectory checks the http or ldap router's section.
func (c *Config) validateDirectory() error {
	var err error
	switch c.Routing.Router {
	case RouterHTTP:
		_, err = c.HTTPRouterConfig()
	case RouterLDAP:
		_, err = c.LDAPRouterConfig()
	}
	return err
}
