package config

import (
	"testing"

	"github.com/imapgate/imapgate/proxy"
)

// tls.record_takeover (absent and true hand TLS 1.3 sessions over, false
// keeps crypto/tls) and splice.event_loop (absent and true leave the
// event loops on, false runs every spliced session in goroutines).
func TestDataPathSwitches(t *testing.T) {
	for _, tc := range []struct {
		toml string
		rec  proxy.RecordMode
		loop proxy.LoopMode
	}{
		{"", proxy.RecordsTakeover, proxy.LoopAuto},
		{"[tls]\nrecord_takeover = true\n", proxy.RecordsTakeover, proxy.LoopAuto},
		{"[tls]\nrecord_takeover = false\n", proxy.RecordsCryptoTLS, proxy.LoopAuto},
		{"[splice]\nevent_loop = true\n", proxy.RecordsTakeover, proxy.LoopAuto},
		{"[splice]\nevent_loop = false\n", proxy.RecordsTakeover, proxy.LoopOff},
	} {
		c, err := Parse(tc.toml)
		if err != nil {
			t.Fatal(err)
		}
		o, err := c.ProxyOptions()
		if err != nil {
			t.Fatal(err)
		}
		if o.TLSRecords != tc.rec || o.SpliceLoop != tc.loop {
			t.Errorf("%q: records %v loop %v, want %v and %v", tc.toml, o.TLSRecords, o.SpliceLoop, tc.rec, tc.loop)
		}
	}
}
