package config

import (
	"strings"
	"testing"
)

func TestKindsParseOnce(t *testing.T) {
	for _, tc := range []struct {
		text string
		ok   func(*Config) bool
		err  string
	}{
		{"", func(c *Config) bool {
			return c.Routing.Router == RouterStatic && c.Log.Format == LogAuto && c.TLS.ACME.Storage == StorageFile && c.TLS.SessionTickets.Store == TicketsAuto
		}, ""},
		{"[routing]\nrouter = \"Consul\"\n", func(c *Config) bool { return c.Routing.Router == RouterConsul && c.Routing.Router.External() }, ""},
		{"[routing]\nrouter = \"ldap\"\n", func(c *Config) bool { return c.Routing.Router.Directory() }, ""},
		{"[routing]\nrouter = \"\"\n", func(c *Config) bool { return c.Routing.Router == RouterStatic }, ""},
		{"[log]\nformat = \"console\"\n", func(c *Config) bool { return c.Log.Format == LogConsole }, ""},
		{"[tls.acme]\nstorage = \"consul\"\n", func(c *Config) bool { return c.TLS.ACME.Storage == StorageConsul }, ""},
		{"[tls.session_tickets]\nstore = \"off\"\n", func(c *Config) bool { return c.TLS.SessionTickets.Store == TicketsOff }, ""},
		{"[routing]\nrouter = \"dns\"\n", nil, "line 2, key routing.router: unknown router"},
		{"[log]\nformat = \"xml\"\n", nil, "key log.format: unknown log format"},
		{"[tls.acme]\nstorage = \"s3\"\n", nil, "key tls.acme.storage: unknown storage"},
	} {
		c, err := Parse(tc.text)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want one with %q", tc.text, err, tc.err)
			}
		case err != nil:
			t.Errorf("%q: %v", tc.text, err)
		case !tc.ok(c):
			t.Errorf("%q: parsed as %+v %+v", tc.text, c.Routing, c.Log)
		}
	}
	for k, want := range map[interface{ String() string }]string{RouterLDAP: "ldap", LogJSON: "json", StorageConsul: "consul", TicketsFile: "file"} {
		if k.String() != want {
			t.Errorf("%#v.String() = %q, want %q", k, k.String(), want)
		}
	}
}
