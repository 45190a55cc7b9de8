package config

import (
	"fmt"
	"strings"
)

// Overrides are the command line's settings, which win over the file's.
// The zero value overrides nothing.
type Overrides struct {
	// ListenTLS and ListenStartTLS are comma-separated addresses of
	// implicit-TLS and STARTTLS listeners; either replaces [[listen]].
	ListenTLS, ListenStartTLS string
	// Cert and Key replace tls.certificates with one pair.
	Cert, Key string
	// LogLevel, LogFormat and HTTPAddr set log.level, log.format and
	// http.addr.
	LogLevel, LogFormat, HTTPAddr string
}

// SingleBackend is the configuration of `imapgate -backend ADDR`: every
// user on one backend, listening on the IMAP ports unless overridden.
func SingleBackend(addr, security, caFile string) *Config {
	return &Config{
		Listen:   []Listen{{Addr: "[::]:993", Mode: "tls"}, {Addr: "[::]:143", Mode: "starttls"}},
		Backends: map[string]Backend{"backend": {Addr: addr, Security: security, CAFile: caFile}},
	}
}

// Apply sets o's non-empty settings on c.
func (o Overrides) Apply(c *Config) error {
	if o.ListenTLS != "" || o.ListenStartTLS != "" {
		c.Listen = nil
		for _, l := range []struct{ addrs, mode string }{{o.ListenTLS, "tls"}, {o.ListenStartTLS, "starttls"}} {
			for a := range strings.SplitSeq(l.addrs, ",") {
				if a = strings.TrimSpace(a); a != "" {
					c.Listen = append(c.Listen, Listen{Addr: a, Mode: l.mode})
				}
			}
		}
	}
	if o.Cert != "" || o.Key != "" {
		c.TLS.Certificates = []CertFile{{Cert: o.Cert, Key: o.Key}}
	}
	if o.LogLevel != "" {
		c.Log.Level = o.LogLevel
	}
	if o.LogFormat != "" {
		if err := c.Log.Format.UnmarshalText([]byte(o.LogFormat)); err != nil {
			return fmt.Errorf("-log-format: %w", err)
		}
	}
	if o.HTTPAddr != "" {
		c.HTTP.Addr = o.HTTPAddr
	}
	return nil
}
