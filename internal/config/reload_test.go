package config

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestReloadClass(t *testing.T) {
	for _, tc := range []struct {
		key          string
		consul, acme bool
		want         ReloadClass
	}{
		{"log.level", false, false, ReloadLive},
		{"log.format", false, false, ReloadRestart},
		{"listen[0].addr", false, false, ReloadRestart},
		{"limits.max_connections", false, false, ReloadLive},
		{"timeouts.idle", false, false, ReloadLive},
		{"preauth.greeting", false, false, ReloadLive},
		{"tls.min_version", false, false, ReloadLive},
		{"tls.certificates[0].cert", false, false, ReloadLive},
		{"tls.certificates[0].cert", false, true, ReloadRestart},
		{"tls.acme.email", false, false, ReloadRestart},
		{"backends.b1.addr", false, false, ReloadLive},
		{"backends.b1.addr", true, false, ReloadIgnored},
		{`routing.users."a@b"`, false, false, ReloadLive},
		{"routing.router", false, false, ReloadRestart},
		{"backend.ca_file", false, false, ReloadLive},
		{"backend.ca_file", true, false, ReloadRestart},
		{"backend.no_forward_id", false, false, ReloadLive},
		{"backend.master.user", false, false, ReloadLive},
		{"consul.grace", true, false, ReloadRestart},
		{"http.admin_token", false, false, ReloadLive},
		{"http.addr", false, false, ReloadRestart},
		{"shutdown.drain_window", false, false, ReloadLive},
		{"routing.router", true, false, ReloadRestart}, // a field's own tag wins over its section's condition
		{"routing.http.url", true, false, ReloadRestart},
		{"routing.default", true, false, ReloadIgnored},
		{"consul.move_hold", true, false, ReloadRestart},
		{"tls.session_tickets.store", false, false, ReloadRestart},
		{"tls.acme.storage", false, true, ReloadRestart},
		{"lmtp.hostname", false, false, ReloadRestart},
		{"http.hosts", false, false, ReloadLive},
		// A prefix match must be a whole key segment.
		{"listener_x", false, false, ReloadLive},
	} {
		if got := reloadClassOf(tc.key, tc.consul, tc.acme); got != tc.want {
			t.Errorf("reloadClassOf(%q, external=%v, acme=%v) = %v, want %v", tc.key, tc.consul, tc.acme, got, tc.want)
		}
	}
}

func TestDiffKeys(t *testing.T) {
	parse := func(s string) *Config {
		c, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a := parse(`
[[listen]]
addr = "127.0.0.1:1"
[backends.b1]
addr = "127.0.0.1:2"
[routing.users]
"x@y" = "b1"
[http]
admin_token = "one"
[backend.master]
user = "m"
password = "secret1"
`)
	b := parse(`
[[listen]]
addr = "127.0.0.1:1"
[[listen]]
addr = "127.0.0.1:3"
[backends.b1]
addr = "127.0.0.1:2"
[backends.b2]
addr = "127.0.0.1:4"
[http]
admin_token = "two"
[shutdown]
grace = "1s"
[backend.master]
user = "m"
password = "secret2"
`)
	got := diffKeys(a, b)
	// Whole new entries show every one of their keys (however many the
	// schema has); changed values show their own key.
	prefixes := []string{"backend.master.password", "backends.b2.", "http.admin_token", "listen[1].",
		`routing.users."x@y"`, "shutdown.grace"}
	for _, p := range prefixes {
		if !slices.ContainsFunc(got, func(k string) bool { return strings.HasPrefix(k, p) }) {
			t.Errorf("no changed key under %s in %q", p, got)
		}
	}
	for _, k := range got {
		if !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(k, p) }) {
			t.Errorf("unexpected changed key %s", k)
		}
	}
	if !slices.IsSorted(got) || !slices.Contains(got, "backends.b2.addr") || !slices.Contains(got, "listen[1].addr") {
		t.Errorf("diffKeys: %q", got)
	}
	if d := diffKeys(a, a); len(d) != 0 {
		t.Errorf("a config differs from itself in %q", d)
	}
	for _, k := range got {
		if slices.Contains([]string{"secret1", "secret2", "one", "two"}, k) {
			t.Errorf("a value leaked into the key list: %q", k)
		}
	}
}

// TestReloadTags: every section of the file says what a reload does with
// it, so that a new section cannot be live by accident.
func TestReloadTags(t *testing.T) {
	rt := reflect.TypeFor[Config]()
	for i := range rt.NumField() {
		f := rt.Field(i)
		if _, ok := f.Tag.Lookup("reload"); !ok {
			t.Errorf("Config.%s has no reload tag", f.Name)
		}
		ruleOf(f, reloadRule{}) // panics on a misspelt tag
	}
}

func TestPlanReload(t *testing.T) {
	parse := func(s string) *Config {
		c, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	boot := parse(`
[log]
format = "json"
[[listen]]
addr = "127.0.0.1:1"
[backends.b1]
addr = "127.0.0.1:2"
[backend]
ca_file = "/a.pem"
[routing]
router = "consul"
`)
	next := parse(`
[log]
format = "console"
level = "debug"
[[listen]]
addr = "127.0.0.1:9"
[backends.b1]
addr = "127.0.0.1:3"
[backend]
ca_file = "/b.pem"
[limits]
max_bad_commands = 9
[routing]
router = "consul"
`)
	p := PlanReload(boot, boot, next)
	if !slices.Equal(p.Applied, []string{"limits.max_bad_commands", "log.level"}) {
		t.Errorf("applied %q", p.Applied)
	}
	if !slices.Equal(p.Restart, []string{"backend.ca_file", "listen[0].addr", "log.format"}) {
		t.Errorf("restart %q", p.Restart)
	}
	if !slices.Equal(p.Ignored, []string{"backends.b1.addr"}) {
		t.Errorf("ignored %q", p.Ignored)
	}
	in := p.InForce
	if in.Log.Format != LogJSON || in.Listen[0].Addr != "127.0.0.1:1" || in.Backend.CAFile != "/a.pem" {
		t.Errorf("restart-only keys not kept at their start-up values: %+v %+v %+v", in.Log, in.Listen, in.Backend)
	}
	if in.Log.Level != "debug" || in.Limits.MaxBadCommands != 9 || in.Backends["b1"].Addr != "127.0.0.1:3" {
		t.Errorf("live and ignored keys not taken from the new file: %+v %+v %+v", in.Log, in.Limits, in.Backends)
	}
	if next.Log.Format != LogConsole {
		t.Error("PlanReload changed its argument")
	}
}

// TestPlanReloadTLS: [tls] is live until ACME is in use (in the old or
// the new file); then the whole section keeps its start-up value.
func TestPlanReloadTLS(t *testing.T) {
	boot, _ := Parse("[tls]\nmin_version = \"1.2\"\n")
	live, _ := Parse("[tls]\nmin_version = \"1.3\"\n")
	acme, _ := Parse("[tls]\nmin_version = \"1.3\"\n[tls.acme]\nnames = [\"mail.example\"]\n")
	p := PlanReload(boot, boot, live)
	if p.InForce.TLS.MinVersion != "1.3" || !slices.Equal(p.Applied, []string{"tls.min_version"}) || len(p.Restart) != 0 {
		t.Errorf("without ACME: %+v", p)
	}
	p = PlanReload(boot, boot, acme)
	if p.InForce.TLS.MinVersion != "1.2" || p.InForce.TLS.UsesACME() || len(p.Applied) != 0 ||
		!slices.Equal(p.Restart, []string{"tls.acme.names", "tls.min_version"}) {
		t.Errorf("with ACME in the new file: applied %q restart %q, in force %+v", p.Applied, p.Restart, p.InForce.TLS)
	}
	// Back to the start-up file: nothing left to restart for.
	if p := PlanReload(boot, p.InForce, boot); len(p.Restart) != 0 || len(p.Applied) != 0 {
		t.Errorf("back to the start-up file: %+v", p)
	}
}
