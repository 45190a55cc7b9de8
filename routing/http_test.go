package routing

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"
)

// authService is an nginx auth_http service: users map to "host:port",
// "host" (no Auth-Port) or a refusal text starting with "!".
type authService struct {
	t      *testing.T
	srv    *httptest.Server
	mu     sync.Mutex
	users  map[string]string
	reqs   []http.Header
	secret string
	status int           // reply status; 0 means 200
	delay  chan struct{} // if set, replies wait for it to close
	wait   string        // Auth-Wait on refusals
}

func newAuthService(t *testing.T, users map[string]string) *authService {
	a := &authService{t: t, users: users, secret: "s3cret"}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *authService) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.reqs = append(a.reqs, r.Header.Clone())
	// Services unescape as nginx escapes (%XX).
	user, _ := url.PathUnescape(r.Header.Get("Auth-User"))
	ans, ok := a.users[user]
	status, delay, wait := a.status, a.delay, a.wait
	a.mu.Unlock()
	if delay != nil {
		select {
		case <-delay:
		case <-r.Context().Done():
			return
		}
	}
	if r.Header.Get("X-Auth-Key") != a.secret {
		w.Header().Set("Auth-Status", "bad secret")
		return
	}
	if status != 0 {
		w.WriteHeader(status)
		return
	}
	switch {
	case !ok:
		w.Header().Set("Auth-Status", "Invalid login or password")
		if wait != "" {
			w.Header().Set("Auth-Wait", wait)
		}
	case ans[0] == '!':
		w.Header().Set("Auth-Status", ans[1:])
		w.Header().Set("Auth-Error-Code", "535 5.7.0")
	default:
		host, port, err := net.SplitHostPort(ans)
		if err != nil {
			host, port = ans, ""
		}
		w.Header().Set("Auth-Status", "OK")
		w.Header().Set("Auth-Server", host)
		if port != "" {
			w.Header().Set("Auth-Port", port)
		}
	}
	w.Write([]byte("the body is ignored"))
}

func (a *authService) set(user, ans string) {
	a.mu.Lock()
	a.users[user] = ans
	a.mu.Unlock()
}

func (a *authService) requests() []http.Header {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]http.Header(nil), a.reqs...)
}

func newTestHTTP(t *testing.T, a *authService, cfg HTTPConfig) *HTTP {
	t.Helper()
	cfg.URL = a.srv.URL + "/auth?key=hidden"
	cfg.Header = http.Header{"X-Auth-Key": {a.secret}}
	h, err := NewHTTP(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

var testLogin = Login{Password: "pa ss%wörd", Method: "plain", Protocol: "imap", Attempt: 2, Client: netip.MustParseAddr("192.0.2.42")}

func TestHTTPRouterAnswers(t *testing.T) {
	a := newAuthService(t, map[string]string{
		"alice@example.org": "10.0.0.1:1143",
		"bob@example.org":   "mail2.example.org",
		"a b%c":             "10.0.0.3:143",
		"carol@example.org": "!Account disabled",
		"dave@example.org":  "10.0.0.4:99999",
		"erin@example.org":  "0]0:1", // found by FuzzAuthReply: once dialled as "0]0:1"
		"frank@example.org": "user@evil:143",
		"gina@example.org":  "[::%/]:1", // found by FuzzAuthReply: an IPv6 zone made "[::%/]:1"
	})
	known := &Backend{ID: "dovecot1", Addr: "10.0.0.1:1143", Security: SecurityStartTLS}
	h := newTestHTTP(t, a, HTTPConfig{Directory: DirectoryOptions{DefaultPort: 10143, Known: []*Backend{known}}})
	ctx := WithLogin(context.Background(), testLogin)
	for _, tc := range []struct {
		user, addr, id string
		refused        string // a RefusedError with this reason
		fails          bool   // another error
	}{
		{user: "Alice@Example.org", addr: "10.0.0.1:1143", id: "dovecot1"},
		{user: "bob@example.org", addr: "mail2.example.org:10143", id: "mail2.example.org:10143"},
		{user: "a b%c", addr: "10.0.0.3:143", id: "10.0.0.3:143"},
		{user: "carol@example.org", refused: "Account disabled (535 5.7.0)"},
		{user: "nobody@example.org", refused: "Invalid login or password"},
		{user: "dave@example.org", fails: true},
		{user: "erin@example.org", fails: true},
		{user: "frank@example.org", fails: true},
		{user: "gina@example.org", fails: true},
	} {
		b, err := h.Route(ctx, tc.user)
		var r *RefusedError
		switch {
		case tc.refused != "":
			if !errors.As(err, &r) || r.Reason != tc.refused || !errors.Is(err, ErrNoBackend) {
				t.Errorf("%s: %v, %v; want a refusal %q wrapping ErrNoBackend", tc.user, b, err, tc.refused)
			}
		case tc.fails:
			if err == nil || errors.As(err, &r) || !errors.Is(err, ErrNoBackend) {
				t.Errorf("%s: %v, %v; want an ErrNoBackend that is not a refusal", tc.user, b, err)
			}
		case err != nil:
			t.Errorf("%s: %v", tc.user, err)
		case b.Addr != tc.addr || b.ID != tc.id:
			t.Errorf("%s: backend %s at %s, want %s at %s", tc.user, b.ID, b.Addr, tc.id, tc.addr)
		}
	}
	if b, _ := h.Route(ctx, "alice@example.org"); b != known {
		t.Errorf("a known backend's address gives %+v, want the configured *Backend", b)
	}
}

func TestHTTPRouterRequestHeaders(t *testing.T) {
	for _, send := range []bool{false, true} {
		t.Run("send_password="+strconv.FormatBool(send), func(t *testing.T) {
			a := newAuthService(t, map[string]string{"a b%c": "10.0.0.3:143"})
			h := newTestHTTP(t, a, HTTPConfig{SendPassword: send})
			if _, err := h.Route(WithLogin(context.Background(), testLogin), "a b%c"); err != nil {
				t.Fatal(err)
			}
			reqs := a.requests()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			want := map[string]string{
				"Auth-Method": "plain", "Auth-User": "a%20b%25c", "Auth-Protocol": "imap",
				"Auth-Login-Attempt": "2", "Client-Ip": "192.0.2.42", "Client-Host": "[UNAVAILABLE]",
				"Auth-Pass": "",
			}
			if send {
				want["Auth-Pass"] = "pa%20ss%25w%C3%B6rd"
			}
			for k, v := range want {
				if got := reqs[0].Get(k); got != v {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
			if _, present := reqs[0]["Auth-Pass"]; present != send {
				t.Errorf("Auth-Pass present = %v, want %v", present, send)
			}
		})
	}
}

func TestHTTPRouterCache(t *testing.T) {
	a := newAuthService(t, map[string]string{"u1": "10.0.0.1:143", "u2": "10.0.0.2:143", "u3": "10.0.0.3:143"})
	h := newTestHTTP(t, a, HTTPConfig{Directory: DirectoryOptions{TTL: 200 * time.Millisecond, NegativeTTL: time.Hour, CacheSize: 2}})
	ctx := context.Background()
	route := func(user string) {
		t.Helper()
		if _, err := h.Route(ctx, user); err != nil && user != "nobody" {
			t.Fatal(err)
		}
	}
	asked := func(want int) {
		t.Helper()
		if n := len(a.requests()); n != want {
			t.Fatalf("the service was asked %d times, want %d", n, want)
		}
	}
	route("u1")
	route("u1")
	asked(1) // cached
	route("nobody")
	route("nobody")
	asked(2) // refusals cached too
	route("u2")
	route("u3") // the cache holds 2: u1 goes
	asked(4)
	route("u1")
	asked(5)
	// Past the TTL the service is asked again: this is how soon a change
	// in the directory (a move) applies.
	a.set("u1", "10.0.0.9:143")
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := h.Route(ctx, "u1")
		if err != nil {
			t.Fatal(err)
		}
		if b.Addr == "10.0.0.9:143" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the new answer never applied")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s := h.Stats(); s.Hits == 0 || s.Misses < 6 || s.Refusals != 1 {
		t.Errorf("stats %+v", s)
	}
	// Forget applies a change at once.
	a.set("u2", "10.0.0.8:143")
	h.Forget("U2")
	if b, _ := h.Route(ctx, "u2"); b == nil || b.Addr != "10.0.0.8:143" {
		t.Errorf("after Forget: %v", b)
	}
}

// With the password sent, the password is part of the question: a cached
// OK is not reused for another password, nor a refusal for the right one.
func TestHTTPRouterCacheWithPassword(t *testing.T) {
	a := newAuthService(t, map[string]string{"u1": "10.0.0.1:143"})
	h := newTestHTTP(t, a, HTTPConfig{SendPassword: true})
	l := testLogin
	for i, pass := range []string{"right", "right", "wrong", "wrong", "right"} {
		l.Password = pass
		if _, err := h.Route(WithLogin(context.Background(), l), "u1"); err != nil {
			t.Fatal(i, err)
		}
	}
	if n := len(a.requests()); n != 2 {
		t.Errorf("asked %d times for two passwords, want 2", n)
	}
}

func TestHTTPRouterFailuresAreNotCached(t *testing.T) {
	a := newAuthService(t, map[string]string{"u1": "10.0.0.1:143"})
	h := newTestHTTP(t, a, HTTPConfig{Timeout: 200 * time.Millisecond})
	ctx := context.Background()
	a.status = http.StatusInternalServerError
	if _, err := h.Route(ctx, "u1"); !errors.Is(err, ErrNoBackend) {
		t.Fatalf("HTTP 500: %v, want ErrNoBackend", err)
	}
	a.mu.Lock()
	a.status = 0
	a.delay = make(chan struct{})
	a.mu.Unlock()
	t0 := time.Now()
	_, err := h.Route(ctx, "u1")
	if !errors.Is(err, ErrNoBackend) || time.Since(t0) > 3*time.Second {
		t.Fatalf("a service that does not answer: %v after %v, want ErrNoBackend after the 200ms timeout", err, time.Since(t0))
	}
	a.mu.Lock()
	close(a.delay)
	a.delay = nil
	a.mu.Unlock()
	if b, err := h.Route(ctx, "u1"); err != nil || b.Addr != "10.0.0.1:143" {
		t.Fatalf("once it answers: %v, %v", b, err)
	}
	if s := h.String(); s != "http("+a.srv.URL+"/auth, cache 1m0s/10s)" {
		t.Errorf("String() = %q (must not show the query, which may hold a secret)", s)
	}
}

// Auth-Wait delays a login's refusal (nginx's tarpit), never an
// operator's lookup.
func TestHTTPRouterAuthWait(t *testing.T) {
	a := newAuthService(t, map[string]string{})
	a.wait = "1"
	h := newTestHTTP(t, a, HTTPConfig{})
	t0 := time.Now()
	if _, err := h.Route(context.Background(), "nobody"); err == nil || time.Since(t0) > 900*time.Millisecond {
		t.Errorf("operator lookup: %v after %v, want a refusal at once", err, time.Since(t0))
	}
	t0 = time.Now()
	if _, err := h.Route(WithLogin(context.Background(), testLogin), "nobody"); err == nil || time.Since(t0) < time.Second {
		t.Errorf("login: %v after %v, want a refusal after Auth-Wait: 1", err, time.Since(t0))
	}
}

// recordingEvictor is a routing.Evictor that remembers its calls; the
// eviction of real sessions is tested through the proxy in cmd/imapgate.
type recordingEvictor struct {
	mu    sync.Mutex
	calls []string
}

func (e *recordingEvictor) EvictUser(user, keep string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.calls = append(e.calls, user+"->"+keep)
	return 1
}
func (e *recordingEvictor) EvictBackend(string) int { return 0 }

func TestHTTPRouterEvictsOnChange(t *testing.T) {
	a := newAuthService(t, map[string]string{"u1": "10.0.0.1:143"})
	ev := &recordingEvictor{}
	h := newTestHTTP(t, a, HTTPConfig{Directory: DirectoryOptions{TTL: -1, Evictor: ev}})
	for _, addr := range []string{"10.0.0.1:143", "10.0.0.1:143", "10.0.0.2:143"} {
		a.set("u1", addr)
		if b, err := h.Route(context.Background(), "u1"); err != nil || b.Addr != addr {
			t.Fatal(b, err)
		}
	}
	want := []string{"u1->10.0.0.1:143", "u1->10.0.0.1:143", "u1->10.0.0.2:143"}
	if len(ev.calls) != len(want) {
		t.Fatalf("evictor calls %q, want %q", ev.calls, want)
	}
	for i := range want {
		if ev.calls[i] != want[i] {
			t.Errorf("evictor calls %q, want %q", ev.calls, want)
		}
	}
}

func TestHTTPRouterConfig(t *testing.T) {
	for _, u := range []string{"", "ftp://x/", "http://", "localhost:9000/auth"} {
		if _, err := NewHTTP(HTTPConfig{URL: u}); err == nil {
			t.Errorf("NewHTTP(%q) accepted", u)
		}
	}
}

// BenchmarkDirectoryRouteCached is the login path's cost with a warm
// cache: what every login but the first in a TTL pays.
func BenchmarkDirectoryRouteCached(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Auth-Status", "OK")
		w.Header().Set("Auth-Server", "10.0.0.1")
	}))
	defer srv.Close()
	h, err := NewHTTP(HTTPConfig{URL: srv.URL})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	ctx := context.Background()
	h.Route(ctx, "alice@example.org")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := h.Route(ctx, "alice@example.org"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHTTPRouteUncached is one auth_http request per login (loopback).
func BenchmarkHTTPRouteUncached(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Auth-Status", "OK")
		w.Header().Set("Auth-Server", "10.0.0.1")
	}))
	defer srv.Close()
	h, err := NewHTTP(HTTPConfig{URL: srv.URL, Directory: DirectoryOptions{TTL: -1}})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := h.Route(ctx, "alice@example.org"); err != nil {
			b.Fatal(err)
		}
	}
}
