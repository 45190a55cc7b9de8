package main

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/imapgate/imapgate/internal/config"
)

// This file keeps the admin API closed: a reload is checked against the
// configuration that will actually be in force (the HTTP listener stays
// bound where it started, whatever the new file says), and a tokenless
// API refuses requests whose Host a browser could have reached through a
// rebinding DNS name.

// checkInForce validates eff, the configuration a reload would put in
// force, as a whole (keys that need a restart keep their start-up values
// in it) and against the admin listener actually bound.
func (a *app) checkInForce(eff *config.Config) error {
	if err := eff.Validate(); err != nil {
		return fmt.Errorf("the configuration in force after this reload would be invalid: %w", err)
	}
	if a.httpAddr != nil {
		if err := config.CheckAdminExposure(a.httpAddr.String(), eff.HTTP.AdminToken); err != nil {
			return fmt.Errorf("refused: the admin API stays bound to %s until a restart: %w", a.httpAddr, err)
		}
	}
	return nil
}

// hostAllowed reports whether a request's Host names this admin API: an
// IP address (the listener's, or any when it listens on every address),
// localhost, or one of http.hosts. A DNS-rebinding page's requests carry
// the attacker's name, which is none of these.
func (a *app) hostAllowed(r *http.Request) bool {
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		bound := netip.Addr{}
		if ta, ok := a.httpAddr.(*net.TCPAddr); ok {
			bound = ta.AddrPort().Addr().Unmap()
		}
		return !bound.IsValid() || bound.IsUnspecified() || ip.Unmap() == bound
	}
	return slices.ContainsFunc(a.cfg.Load().HTTP.Hosts, func(n string) bool { return strings.EqualFold(n, host) })
}
