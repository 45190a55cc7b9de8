package config

import (
	"testing"

	"github.com/imapgate/imapgate/proxy"
)

// splice.event_loop: absent and true leave the event loops on, false runs
// every spliced session in goroutines.
func TestSpliceEventLoop(t *testing.T) {
	for _, tc := range []struct {
		toml string
		want proxy.LoopMode
	}{
		{"", proxy.LoopAuto},
		{"[splice]\nevent_loop = true\n", proxy.LoopAuto},
		{"[splice]\nevent_loop = false\n", proxy.LoopOff},
	} {
		c, err := Parse(tc.toml)
		if err != nil {
			t.Fatal(err)
		}
		o, err := c.ProxyOptions()
		if err != nil {
			t.Fatal(err)
		}
		if o.SpliceLoop != tc.want {
			t.Errorf("%q: %v, want %v", tc.toml, o.SpliceLoop, tc.want)
		}
	}
}
