package admin

import (
	"crypto/sha256"
	"crypto/subtle"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
)

// This file keeps the admin API closed. When http.admin_token is set
// every /admin/ request must carry "Authorization: Bearer <token>" (the
// status page also takes it as the password of HTTP Basic auth, so that a
// browser can send it). Requests that a browser could send on a web
// page's behalf (an Origin header, Sec-Fetch-Site: cross-site) are
// refused, and so are requests to a tokenless API whose Host is not its
// address, localhost or one of http.hosts (DNS rebinding), so a loopback
// API without a token is not open to every page the operator visits.

// crossSite reports whether a browser sent r on another site's behalf.
func crossSite(r *http.Request) bool {
	return r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") == "cross-site"
}

// tokenOK compares in constant time, both sides hashed first so that not
// even the token's length leaks.
func tokenOK(got, want string) bool {
	w := sha256.Sum256([]byte(want))
	h := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(w[:], h[:]) == 1
}

// adminAuth guards the admin API.
func (s *Server) adminAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if crossSite(r) {
			writeError(w, errorf(http.StatusForbidden, "cross-origin requests to the admin API are refused"))
			return
		}
		acc := s.o.Access()
		if acc.Token == "" && !s.hostAllowed(r, acc.Hosts) {
			// No token: the loopback listener is all that protects the
			// API, and a rebinding DNS name would get a page past it.
			writeError(w, errorf(http.StatusForbidden, "Host %q is not this admin API's (allowed: its address, localhost, http.hosts)", r.Host))
			return
		}
		if acc.Token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || !tokenOK(got, acc.Token) {
				w.Header().Set("WWW-Authenticate", `Bearer realm="imapgate admin"`)
				writeError(w, errorf(http.StatusUnauthorized, "missing or wrong admin token (Authorization: Bearer ...)"))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// statusAuth is adminAuth's rules for a page a browser opens: the token
// may also come as the password of HTTP Basic auth (any user name), and a
// missing one asks the browser for it.
func (s *Server) statusAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if crossSite(r) {
			http.Error(w, "cross-origin requests are refused", http.StatusForbidden)
			return
		}
		if token := s.o.Access().Token; token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok {
				_, got, ok = r.BasicAuth()
			}
			if !ok || !tokenOK(got, token) {
				w.Header().Set("WWW-Authenticate", `Basic realm="imapgate status (password: the admin token)", charset="UTF-8"`)
				http.Error(w, "missing or wrong admin token", http.StatusUnauthorized)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// hostAllowed reports whether a request's Host names this admin API: an
// IP address (the listener's, or any when it listens on every address),
// localhost, or one of hosts. A DNS-rebinding page's requests carry the
// attacker's name, which is none of these.
func (s *Server) hostAllowed(r *http.Request, hosts []string) bool {
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
		if ta, ok := s.o.Addr.(*net.TCPAddr); ok {
			bound = ta.AddrPort().Addr().Unmap()
		}
		return !bound.IsValid() || bound.IsUnspecified() || ip.Unmap() == bound
	}
	return slices.ContainsFunc(hosts, func(n string) bool { return strings.EqualFold(n, host) })
}
