package admin

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// process stands in for the binary's app: its state is two flags, and a
// reload reports what it was told to.
type process struct {
	ready, draining atomic.Bool
	reloads         atomic.Int32
}

func (p *process) Ready() bool    { return p.ready.Load() }
func (p *process) Draining() bool { return p.draining.Load() }
func (p *process) Reload(context.Context) adminapi.ReloadReport {
	p.reloads.Add(1)
	return adminapi.ReloadReport{Result: adminapi.Refused, Error: "test"}
}

// newTestServer is the handler over a real routing.Table with one
// backend and a real proxy.Server with no listener.
func newTestServer(t *testing.T, acc Access, bound net.Addr) (*Server, *process) {
	t.Helper()
	table, err := routing.NewTable(routing.StaticConfig{
		Backends: map[string]*routing.Backend{"b1": {ID: "b1", Addr: "127.0.0.1:1"}},
	}, nil, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	srv, err := proxy.NewServer(proxy.Options{Router: table})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	reg := prometheus.NewRegistry()
	p := &process{}
	m := NewMetrics(reg, MetricsOptions{Ready: p.Ready, Certificates: func() []igtls.CertExpiry { return nil }, Backends: table.Backends})
	return New(Options{
		Sessions: srv, Router: table, RouterKind: "static", InstanceDrains: true, Instance: p,
		Access: func() Access { return acc }, Addr: bound, Gatherer: reg, Metrics: m, Started: time.Now(),
	}), p
}

func TestReadyz(t *testing.T) {
	s, p := newTestServer(t, Access{}, nil)
	get := func() (int, string) {
		w := httptest.NewRecorder()
		s.ServeHTTP(w, httptest.NewRequest("GET", "/readyz", nil))
		return w.Code, w.Body.String()
	}
	if code, body := get(); code != 503 || !strings.Contains(body, "not ready") {
		t.Errorf("starting: %d %q", code, body)
	}
	p.ready.Store(true)
	if code, body := get(); code != 200 || body != "ready\n" {
		t.Errorf("ready: %d %q", code, body)
	}
	p.draining.Store(true)
	if code, body := get(); code != 503 || !strings.Contains(body, "draining") {
		t.Errorf("draining: %d %q", code, body)
	}
}

func TestAccess(t *testing.T) {
	loopback := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8080}
	for _, tc := range []struct {
		name   string
		acc    Access
		path   string
		host   string
		header map[string]string
		basic  string
		want   int
	}{
		{"token", Access{Token: "tok"}, "/admin/backends", "", map[string]string{"Authorization": "Bearer tok"}, "", 200},
		{"no token", Access{Token: "tok"}, "/admin/backends", "", nil, "", 401},
		{"wrong token", Access{Token: "tok"}, "/admin/backends", "", map[string]string{"Authorization": "Bearer tok2"}, "", 401},
		{"basic is for the page only", Access{Token: "tok"}, "/admin/backends", "", nil, "tok", 401},
		{"page with basic", Access{Token: "tok"}, "/", "", nil, "tok", 200},
		{"page without", Access{Token: "tok"}, "/", "", nil, "", 401},
		{"cross-site", Access{Token: "tok"}, "/admin/backends", "", map[string]string{"Authorization": "Bearer tok", "Origin": "https://evil.example"}, "", 403},
		{"cross-site page", Access{}, "/", "", map[string]string{"Sec-Fetch-Site": "cross-site"}, "", 403},
		{"tokenless, its address", Access{}, "/admin/backends", "127.0.0.1:8080", nil, "", 200},
		{"tokenless, localhost", Access{}, "/admin/backends", "localhost:8080", nil, "", 200},
		{"tokenless, a listed name", Access{Hosts: []string{"Admin.Example"}}, "/admin/backends", "admin.example.", nil, "", 200},
		{"tokenless, rebinding", Access{}, "/admin/backends", "rebind.attacker.example", nil, "", 403},
		{"tokenless, another address", Access{}, "/admin/backends", "127.0.0.2", nil, "", 403},
		{"metrics are open", Access{Token: "tok"}, "/metrics", "scraper.example", nil, "", 200},
		{"unknown endpoint", Access{Token: "tok"}, "/admin/nothing", "", map[string]string{"Authorization": "Bearer tok"}, "", 404},
	} {
		s, _ := newTestServer(t, tc.acc, loopback)
		r := httptest.NewRequest("GET", tc.path, nil)
		if tc.host != "" {
			r.Host = tc.host
		}
		for k, v := range tc.header {
			r.Header.Set(k, v)
		}
		if tc.basic != "" {
			r.SetBasicAuth("admin", tc.basic)
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if w.Code != tc.want {
			t.Errorf("%s: %d, want %d (%s)", tc.name, w.Code, tc.want, w.Body.String())
		}
	}
}

func TestReloadAnswer(t *testing.T) {
	s, p := newTestServer(t, Access{}, nil)
	w := httptest.NewRecorder()
	r := httptest.NewRequest("POST", "/admin/reload", nil)
	r.Host = "localhost"
	s.ServeHTTP(w, r)
	if w.Code != http.StatusUnprocessableEntity || p.reloads.Load() != 1 || !strings.Contains(w.Body.String(), `"result": "refused"`) {
		t.Errorf("refused reload: %d %s", w.Code, w.Body.String())
	}
}
