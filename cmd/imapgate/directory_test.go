package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/testenv"
)

// startDirectoryApp is startTestApp with routing.router = router and the
// section extra, over the two in-memory backends b1 and b2 (returned).
func startDirectoryApp(t *testing.T, router, extra string) (*testApp, string, string) {
	t.Helper()
	return startTestAppText(t, func(b1, b2 string) string {
		return strings.Replace(testConfig(b1, b2, extra), "[routing]\n", fmt.Sprintf("[routing]\nrouter = %q\n", router), 1)
	})
}

// nginxAuth is an auth_http service: users map to a backend address.
type nginxAuth struct {
	mu    sync.Mutex
	users map[string]string
	pass  []string // Auth-Pass of every request
	login []string // "Auth-Method Auth-Protocol Auth-Login-Attempt Client-IP" of every request
}

func (n *nginxAuth) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	addr, ok := n.users[r.Header.Get("Auth-User")]
	n.pass = append(n.pass, r.Header.Get("Auth-Pass"))
	n.login = append(n.login, strings.Join([]string{r.Header.Get("Auth-Method"), r.Header.Get("Auth-Protocol"), r.Header.Get("Auth-Login-Attempt"), r.Header.Get("Client-IP")}, " "))
	n.mu.Unlock()
	if !ok {
		w.Header().Set("Auth-Status", "Invalid login or password")
		return
	}
	host, port, _ := net.SplitHostPort(addr)
	w.Header().Set("Auth-Status", "OK")
	w.Header().Set("Auth-Server", host)
	w.Header().Set("Auth-Port", port)
}

func (n *nginxAuth) set(user, addr string) {
	n.mu.Lock()
	n.users[user] = addr
	n.mu.Unlock()
}

// TestDirectoryRoutersThroughProxy logs users in through imapgate with
// the http router (an nginx auth_http service) and the ldap router (a
// real slapd), then moves a user in the directory: the next login lands
// on the new backend and the live session on the old one is evicted, so
// the user is never on two backends.
func TestDirectoryRoutersThroughProxy(t *testing.T) {
	for _, router := range []string{"http", "ldap"} {
		t.Run(router, func(t *testing.T) {
			var move func(user, addr string)
			var extra string
			var auth *nginxAuth
			var slapd *testenv.Slapd
			switch router {
			case "http":
				auth = &nginxAuth{users: map[string]string{}}
				srv := httptest.NewServer(auth)
				t.Cleanup(srv.Close)
				// A negative TTL: every login asks (the test needs no waiting).
				extra = fmt.Sprintf("[routing.http]\nurl = %q\n[routing.directory]\ncache_ttl = \"-1s\"\n", srv.URL+"/auth")
				move = auth.set
			case "ldap":
				slapd = testenv.StartSlapd(t, testenv.SlapdOptions{Users: map[string]string{"alice@example.org": "placeholder", "bob@example.org": "placeholder"}})
				pw := filepath.Join(t.TempDir(), "bindpw")
				os.WriteFile(pw, []byte(slapd.BindPassword+"\n"), 0o600)
				extra = fmt.Sprintf("[routing.ldap]\nurl = %q\nbind_dn = %q\nbind_password_file = %q\nbase_dn = %q\nfilter = \"(mail=%%u)\"\n[routing.directory]\ncache_ttl = \"-1s\"\n",
					slapd.URL, slapd.BindDN, pw, slapd.BaseDN)
				move = func(user, addr string) {
					uid, _, _ := strings.Cut(user, "@")
					slapd.Modify(t, fmt.Sprintf("dn: uid=%s,ou=people,dc=example,dc=org\nchangetype: modify\nreplace: mailHost\nmailHost: %s\n", uid, addr))
				}
			}
			ta, b1, b2 := startDirectoryApp(t, router, extra)
			move("alice@example.org", b1)
			move("bob@example.org", b2)

			c1, on := ta.home(t, "alice@example.org")
			if on != "b1" {
				t.Fatalf("alice on %s, want b1", on)
			}
			if _, on := ta.home(t, "bob@example.org"); on != "b2" {
				t.Fatalf("bob on %s, want b2", on)
			}
			// Not in the directory: refused, and the service's text is not shown.
			c, err := opsDial(ta.imap, false)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.login("nobody@example.org", "x"); err == nil || strings.Contains(err.Error(), "Invalid login") {
				t.Errorf("unknown user: %v", err)
			}

			move("alice@example.org", b2)
			if _, on := ta.home(t, "alice@example.org"); on != "b2" {
				t.Fatalf("alice after the move on %s, want b2", on)
			}
			if err := c1.waitClosed(5 * time.Second); err != nil {
				t.Fatalf("alice's session on b1 after she moved to b2: %v", err)
			}
			// The admin API lists the backends the directory named.
			var br adminapi.BackendsReply
			if code := getJSON(t, ta.admin+"/admin/backends", testToken, &br); code != 200 || br.Router != router || len(br.Backends) != 2 {
				t.Errorf("GET /admin/backends: %d %+v", code, br)
			}
			m := fetchText(t, ta.admin+"/metrics")
			if v, ok := metricValue(m, "imapgate_directory_evicted_sessions_total"); !ok || v < 1 {
				t.Errorf("imapgate_directory_evicted_sessions_total = %v, %v; want >= 1", v, ok)
			}
			if v, ok := metricValue(m, "imapgate_directory_lookups_total"); !ok || v < 3 {
				t.Errorf("imapgate_directory_lookups_total = %v, %v; want >= 3", v, ok)
			}
			// The status page's search is the router's Where.
			req, _ := http.NewRequest("GET", ta.admin+"/?user=alice@example.org", nil)
			req.Header.Set("Authorization", "Bearer "+testToken)
			resp, err := opsHTTP.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			var page strings.Builder
			io.Copy(&page, resp.Body)
			resp.Body.Close()
			if !strings.Contains(page.String(), `id="where-next">b2<`) || !strings.Contains(page.String(), "the "+router+" directory names 127.0.0.1:") {
				t.Errorf("status page search for alice:\n%s", page.String())
			}
			if auth != nil {
				auth.mu.Lock()
				for _, p := range auth.pass {
					if p != "" {
						t.Errorf("Auth-Pass sent without send_password: %q", p)
					}
				}
				// What the proxy knows of the login reaches the service.
				if !slices.Contains(auth.login, "login imap 1 127.0.0.1") {
					t.Errorf("requests' login headers %q, want one \"login imap 1 127.0.0.1\"", auth.login)
				}
				auth.mu.Unlock()
			}
		})
	}
}

func TestDirectoryRouterConfigErrors(t *testing.T) {
	for name, section := range map[string]string{
		"http without url":       "[routing.http]\ntimeout = \"1s\"\n",
		"http bad url":           "[routing.http]\nurl = \"localhost:9000\"\n",
		"ldap without base":      "[routing.ldap]\nurl = \"ldap://127.0.0.1\"\nfilter = \"(mail=%u)\"\n",
		"ldap missing pw file":   "[routing.ldap]\nurl = \"ldap://127.0.0.1\"\nbase_dn = \"dc=x\"\nfilter = \"(mail=%u)\"\nbind_dn = \"cn=a\"\nbind_password_file = \"/nonexistent/pw\"\n",
		"http bad header":        "[routing.http]\nurl = \"http://127.0.0.1/\"\nheaders = [\"no colon\"]\n",
		"bad directory security": "[routing.http]\nurl = \"http://127.0.0.1/\"\n[routing.directory]\nsecurity = \"rot13\"\n",
	} {
		router := "http"
		if strings.HasPrefix(name, "ldap") {
			router = "ldap"
		}
		text := strings.Replace(testConfig("127.0.0.1:1", "127.0.0.1:2", section), "[routing]\n", fmt.Sprintf("[routing]\nrouter = %q\n", router), 1)
		cfg, err := config.Parse(text)
		if err == nil {
			err = cfg.Validate()
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A reload reports the directory routers' sections and the backends they
// hold as needing a restart or unused, never as applied.
func TestDirectoryRouterReload(t *testing.T) {
	auth := &nginxAuth{users: map[string]string{}}
	srv := httptest.NewServer(auth)
	t.Cleanup(srv.Close)
	extra := fmt.Sprintf("[routing.http]\nurl = %q\n", srv.URL)
	ta, _, _ := startDirectoryApp(t, "http", extra)
	b, err := os.ReadFile(ta.path)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(b), extra, extra+"timeout = \"2s\"\n", 1)
	text = strings.Replace(text, "[backends.b1]\n", "[backends.b1]\nweight = 3\n", 1)
	write(t, ta.path, text)
	rep := ta.Reload(context.Background())
	if rep.Result != "applied" || !slices.Contains(rep.Restart, "routing.http.timeout") || slices.Contains(rep.Applied, "backends.b1.weight") || slices.Contains(rep.Applied, "routing.http.timeout") {
		t.Errorf("reload report %+v: want routing.http.timeout to need a restart and backends.b1.weight not applied", rep)
	}
}
