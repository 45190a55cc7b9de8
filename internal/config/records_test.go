package config

import (
	"testing"

	"github.com/imapgate/imapgate/proxy"
)

// tls.record_takeover: absent and true hand TLS 1.3 sessions over, false
// keeps crypto/tls.
func TestRecordTakeover(t *testing.T) {
	for _, tc := range []struct {
		toml string
		want proxy.RecordMode
	}{
		{"", proxy.RecordsTakeover},
		{"[tls]\nrecord_takeover = true\n", proxy.RecordsTakeover},
		{"[tls]\nrecord_takeover = false\n", proxy.RecordsCryptoTLS},
	} {
		c, err := Parse(tc.toml)
		if err != nil {
			t.Fatal(err)
		}
		o, err := c.ProxyOptions()
		if err != nil {
			t.Fatal(err)
		}
		if o.TLSRecords != tc.want {
			t.Errorf("%q: %v, want %v", tc.toml, o.TLSRecords, tc.want)
		}
	}
}
