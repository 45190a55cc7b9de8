package main

import (
	"slices"
	"strings"
	"testing"

	"github.com/imapgate/imapgate/internal/config"
)

func TestReloadClass(t *testing.T) {
	for _, tc := range []struct {
		key          string
		consul, acme bool
		want         keyClass
	}{
		{"log.level", false, false, classLive},
		{"log.format", false, false, classRestart},
		{"listen[0].addr", false, false, classRestart},
		{"limits.max_connections", false, false, classLive},
		{"timeouts.idle", false, false, classLive},
		{"preauth.greeting", false, false, classLive},
		{"tls.min_version", false, false, classLive},
		{"tls.certificates[0].cert", false, false, classLive},
		{"tls.certificates[0].cert", false, true, classRestart},
		{"tls.acme.email", false, false, classRestart},
		{"backends.b1.addr", false, false, classLive},
		{"backends.b1.addr", true, false, classIgnored},
		{`routing.users."a@b"`, false, false, classLive},
		{"routing.router", false, false, classRestart},
		{"backend.ca_file", false, false, classLive},
		{"backend.ca_file", true, false, classRestart},
		{"backend.no_forward_id", false, false, classLive},
		{"backend.master.user", false, false, classLive},
		{"consul.grace", true, false, classRestart},
		{"http.admin_token", false, false, classLive},
		{"http.addr", false, false, classRestart},
		{"shutdown.drain_window", false, false, classLive},
		// A prefix match must be a whole key segment.
		{"listener_x", false, false, classLive},
	} {
		if got := reloadClass(tc.key, tc.consul, tc.acme); got != tc.want {
			t.Errorf("reloadClass(%q, consul=%v, acme=%v) = %d, want %d", tc.key, tc.consul, tc.acme, got, tc.want)
		}
	}
}

func TestDiffKeys(t *testing.T) {
	parse := func(s string) *config.Config {
		c, err := config.Parse(s)
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
