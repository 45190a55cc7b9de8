package main

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/internal/config"
)

// TestVersionCommand builds the binary with the link-time values the
// package build sets and checks all three places that report them.
func TestVersionCommand(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "imapgate")
	out, err := exec.Command("go", "build", "-ldflags", "-X main.version=9.8.7 -X main.commit=feedface", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	want := "imapgate 9.8.7 (commit feedface"
	for _, args := range [][]string{{"version"}, {"-version"}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		if s := string(out); !strings.HasPrefix(s, want) || !strings.Contains(s, runtime.Version()) {
			t.Errorf("imapgate %v = %q, want %q... with %s", args, s, want, runtime.Version())
		}
	}
}

func TestVersionInMetricsAndAdmin(t *testing.T) {
	ta := startTestApp(t)
	v := currentVersion()
	m := fetchText(t, ta.admin+"/metrics")
	if got, ok := metricValue(m, "imapgate_build_info", `version="`+v.Version+`"`, `commit="`+v.Commit+`"`, `goversion="`+runtime.Version()+`"`); !ok || got != 1 {
		t.Errorf("imapgate_build_info{version=%q,commit=%q} = %v, %v; metrics:\n%s", v.Version, v.Commit, got, ok, grepLines(m, "build_info"))
	}
	code, body := ta.request(t, "GET", "/admin/version", testToken, nil)
	var r adminapi.VersionReply
	if err := json.Unmarshal([]byte(body), &r); code != 200 || err != nil {
		t.Fatalf("GET /admin/version: %d %v\n%s", code, err, body)
	}
	if r.Version.Version != v.Version || r.Commit != v.Commit || r.GoVersion != runtime.Version() || r.UptimeSeconds <= 0 {
		t.Errorf("GET /admin/version = %+v, want %+v and an uptime", r, v)
	}
	if code, _ := ta.request(t, "GET", "/admin/version", "", nil); code != 401 {
		t.Errorf("GET /admin/version without the token: %d, want 401", code)
	}
}

func grepLines(s, sub string) string {
	var b bytes.Buffer
	for l := range strings.Lines(s) {
		if strings.Contains(l, sub) {
			b.WriteString(l)
		}
	}
	return b.String()
}

// TestDebianConffile: the file the Debian package installs as
// /etc/imapgate/imapgate.toml is valid and safe as shipped: the static
// router (no other service needed), the HTTP listener on loopback, no
// cleartext login, ACME state in the package's state directory.
func TestDebianConffile(t *testing.T) {
	cfg := checkTOML(t, filepath.Join(deployDir, "debian", "imapgate.toml"))
	if cfg.Routing.Router != config.RouterStatic || cfg.Consul.Register.Enable {
		t.Errorf("router %v, consul registration %v: want the static router, no Consul", cfg.Routing.Router, cfg.Consul.Register.Enable)
	}
	if cfg.HTTP.Addr != "127.0.0.1:8080" {
		t.Errorf("http.addr %q, want loopback", cfg.HTTP.Addr)
	}
	for _, l := range cfg.Listen {
		if len(l.InsecureAuth) > 0 {
			t.Errorf("listener %s allows cleartext login from %v", l.Addr, l.InsecureAuth)
		}
	}
	if cfg.TLS.ACME.StorageDir != "/var/lib/imapgate/acme" {
		t.Errorf("tls.acme.storage_dir %q, want the package's state directory", cfg.TLS.ACME.StorageDir)
	}
}
