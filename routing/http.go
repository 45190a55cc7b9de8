package routing

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// HTTPConfig configures an HTTP router: the backend of each user comes
// from a service that speaks nginx's auth_http protocol, so an operator
// moving from nginx's mail proxy points imapgate at the same service,
// unchanged. The zero value is not usable: URL is required.
type HTTPConfig struct {
	// URL is the service (nginx's auth_http), http or https.
	URL string
	// Timeout bounds one request. Zero means 5 seconds (nginx's default
	// of 60 s is long for a client waiting on a login).
	Timeout time.Duration
	// Header is added to every request (nginx's auth_http_header): a
	// shared secret the service checks, say.
	Header http.Header
	// SendPassword sends the client's password as Auth-Pass. Off, the
	// service only routes and the backend checks the password (imapgate
	// logs in there with the client's credentials). On, answers and
	// refusals are cached per user and password, so a cached OK is never
	// reused for another password.
	SendPassword bool
	// TLS is the client config for an https URL; nil means the system
	// roots.
	TLS *tls.Config
	// Directory is the cache, the backends' defaults and the evictor.
	Directory DirectoryOptions
}

// HTTP is the auth_http router. Per login it sends
//
//	GET <URL>
//	Auth-Method: login            (the client's mechanism, lower case)
//	Auth-User: alice@example.org  (escaped as nginx does: space, %, controls, non-ASCII)
//	Auth-Pass: ...                (only with SendPassword)
//	Auth-Protocol: imap
//	Auth-Login-Attempt: 1
//	Client-IP: 192.0.2.42
//	Client-Host: [UNAVAILABLE]    (imapgate does no reverse DNS on the login path)
//
// and reads the reply's headers (the body is ignored):
//
//	Auth-Status: OK               then Auth-Server (address or name) and Auth-Port (default DefaultPort)
//	Auth-Status: <any other text> a refusal; Auth-Wait: N delays the client's NO by N seconds
//	                              (at most 30); Auth-Error-Code is logged
//
// A reply other than 200, or a service that does not answer within
// Timeout, is an error that is not cached: the login is refused as
// temporarily unavailable. Auth-User and Auth-Pass in a reply (nginx
// logs in to the backend with them) are not supported: imapgate always
// logs in with the client's own credentials.
type HTTP struct {
	cfg    HTTPConfig
	client *http.Client
	d      *directory
	desc   string
}

var _ Router = (*HTTP)(nil)

// NewHTTP checks cfg and returns the router. It sends nothing yet.
func NewHTTP(cfg HTTPConfig) (*HTTP, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("routing: http router: url %q: want http://host[:port]/path or https://host[:port]/path", cfg.URL)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	tr := &http.Transport{
		Proxy:                  nil, // a login path never goes through $HTTP_PROXY
		TLSClientConfig:        cfg.TLS,
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 64 << 10,
		ForceAttemptHTTP2:      cfg.TLS != nil || u.Scheme == "https",
	}
	h := &HTTP{
		cfg:    cfg,
		client: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		d:      newDirectory("http", cfg.Directory),
		// Scheme, host and path only: a query may hold a secret.
		desc: u.Scheme + "://" + u.Host + u.Path,
	}
	return h, nil
}

// Route asks the service for user's backend, through the cache.
func (h *HTTP) Route(ctx context.Context, user string) (*Backend, error) {
	user = NormalizeUser(user)
	l, hasLogin := LoginFrom(ctx)
	key := h.d.key(user, l.Password, h.cfg.SendPassword && hasLogin)
	b, ok, err := h.d.cached(key)
	if !ok {
		b, err = h.route(ctx, user, key, l, hasLogin)
	}
	if err != nil {
		refusalDelay(ctx, err)
	}
	return b, err
}

func (h *HTTP) route(ctx context.Context, user, key string, l Login, hasLogin bool) (*Backend, error) {
	return h.d.route(ctx, user, key, func(ctx context.Context) (string, int, error) {
		return h.ask(ctx, user, l, hasLogin)
	})
}

// ask sends one request.
func (h *HTTP) ask(ctx context.Context, user string, l Login, hasLogin bool) (string, int, error) {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.cfg.URL, nil)
	if err != nil {
		return "", 0, err
	}
	for k, vs := range h.cfg.Header {
		req.Header[http.CanonicalHeaderKey(k)] = vs
	}
	method, proto, attempt := "none", "imap", 1
	if hasLogin {
		method = strings.ToLower(l.Method)
		if l.Protocol != "" {
			proto = l.Protocol
		}
		attempt = max(l.Attempt, 1)
	}
	req.Header.Set("Auth-Method", method)
	req.Header.Set("Auth-User", escapeMailAuth(user))
	if h.cfg.SendPassword && hasLogin {
		req.Header.Set("Auth-Pass", escapeMailAuth(l.Password))
	}
	req.Header.Set("Auth-Protocol", proto)
	req.Header.Set("Auth-Login-Attempt", strconv.Itoa(attempt))
	if hasLogin && l.Client.IsValid() {
		req.Header.Set("Client-IP", l.Client.Unmap().String())
	}
	req.Header.Set("Client-Host", "[UNAVAILABLE]")
	resp, err := h.client.Do(req)
	if err != nil {
		// url.Error repeats the URL, which may hold a secret in its query.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return "", 0, fmt.Errorf("%s: %w", h.desc, err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10)) // keeps the connection reusable
	if resp.StatusCode != http.StatusOK {
		return "", 0, fmt.Errorf("%s: HTTP status %s", h.desc, resp.Status)
	}
	return parseAuthReply(resp.Header, h.desc)
}

// parseAuthReply reads an auth_http reply's headers: the backend's host
// and port (0: the default) for Auth-Status OK, a *RefusedError for any
// other status, an error for a reply that says neither.
func parseAuthReply(hdr http.Header, desc string) (string, int, error) {
	status := strings.TrimSpace(hdr.Get("Auth-Status"))
	if status == "" {
		return "", 0, fmt.Errorf("%s: reply without Auth-Status", desc)
	}
	if status != "OK" {
		r := &RefusedError{Reason: status}
		if c := hdr.Get("Auth-Error-Code"); c != "" {
			r.Reason += " (" + c + ")"
		}
		if w, err := strconv.Atoi(strings.TrimSpace(hdr.Get("Auth-Wait"))); err == nil && w > 0 {
			r.Wait = time.Duration(min(w, 30)) * time.Second
		}
		return "", 0, r
	}
	server := strings.TrimSpace(hdr.Get("Auth-Server"))
	if server == "" {
		return "", 0, fmt.Errorf("%s: Auth-Status OK without Auth-Server", desc)
	}
	port := 0
	if p := strings.TrimSpace(hdr.Get("Auth-Port")); p != "" {
		var err error
		if port, err = strconv.Atoi(p); err != nil || port <= 0 || port > 65535 {
			return "", 0, fmt.Errorf("%s: bad Auth-Port %q", desc, p)
		}
	}
	return server, port, nil
}

// escapeMailAuth escapes as nginx escapes Auth-User and Auth-Pass: space,
// '%', control characters and bytes above 0x7e become %XX.
func escapeMailAuth(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c == '%' || c >= 0x7f {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// Stats counts lookups, cache hits, refusals and evictions.
func (h *HTTP) Stats() DirectoryStats { return h.d.stats() }

// Forget drops user's cached answers: the next login asks the service.
func (h *HTTP) Forget(user string) { h.d.forget(NormalizeUser(user)) }

// Close releases idle connections to the service.
func (h *HTTP) Close() { h.client.CloseIdleConnections() }

// String describes h for logs.
func (h *HTTP) String() string {
	return fmt.Sprintf("http(%s, cache %v/%v)", h.desc, h.d.o.TTL, h.d.o.NegativeTTL)
}
