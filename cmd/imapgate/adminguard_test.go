package main

import (
	"net/http"
	"strings"
	"testing"
)

// hostRequest sends GET path to the app with the given Host header.
func (ta *testApp) hostRequest(t *testing.T, path, host, token string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", ta.admin+path, nil)
	req.Host = host
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := opsHTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestReloadCannotOpenAdminAPI starts with the admin API on every
// interface with a token; a reload of a file that says loopback and no
// token would leave *:port open without one (the listener stays bound
// where it started), so it is refused and the token stays required.
func TestReloadCannotOpenAdminAPI(t *testing.T) {
	ta := startTestAppWith(t, func(c string) string {
		return strings.Replace(c, `addr = "127.0.0.1:0"`+"\nadmin_token", `addr = "0.0.0.0:0"`+"\nadmin_token", 1)
	})
	if !strings.HasPrefix(ta.httpAddr.String(), "0.0.0.0:") && !strings.HasPrefix(ta.httpAddr.String(), "[::]:") {
		t.Fatalf("admin API bound to %s, want every interface", ta.httpAddr)
	}
	b1, b2 := ta.cfg.Load().Backends["b1"].Addr, ta.cfg.Load().Backends["b2"].Addr
	noToken := strings.Replace(testConfig(b1, b2, ""), `admin_token = "`+testToken+`"`, "", 1)
	write(t, ta.path, noToken)
	rep := ta.Reload(t.Context())
	if rep.Result != "refused" || !strings.Contains(rep.Error, "admin_token") {
		t.Fatalf("reload to loopback without a token: %+v", rep)
	}
	if code := ta.hostRequest(t, "/admin/sessions", "127.0.0.1", ""); code != http.StatusUnauthorized {
		t.Errorf("after the refused reload a request without token got %d, want 401", code)
	}
	if ta.cfg.Load().HTTP.AdminToken != testToken {
		t.Error("the refused reload changed the configuration in force")
	}
}

// TestAdminHostCheck: a tokenless loopback admin API answers only
// requests whose Host is its address, localhost or a configured name, so
// a page cannot reach it through a rebinding DNS name.
func TestAdminHostCheck(t *testing.T) {
	ta := startTestAppWith(t, func(c string) string {
		return strings.Replace(c, `admin_token = "`+testToken+`"`, `hosts = ["admin.example"]`, 1)
	})
	port := ta.httpAddr.String()[strings.LastIndex(ta.httpAddr.String(), ":"):]
	for _, tc := range []struct {
		host string
		want int
	}{
		{"127.0.0.1" + port, 200},
		{"localhost" + port, 200},
		{"LOCALHOST.", 200},
		{"admin.example" + port, 200},
		{"rebind.attacker.example" + port, 403},
		{"127.0.0.2" + port, 403}, // not the listener's address
		{"admin.example.attacker.example", 403},
	} {
		if got := ta.hostRequest(t, "/admin/sessions", tc.host, ""); got != tc.want {
			t.Errorf("Host %q: %d, want %d", tc.host, got, tc.want)
		}
	}
	// Health and metrics stay open to any name (probes, scrapers).
	if got := ta.hostRequest(t, "/metrics", "prometheus.svc.example", ""); got != 200 {
		t.Errorf("/metrics with a foreign Host: %d", got)
	}
}
