package consul

import (
	"testing"

	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

func TestProtocolAddrsFromMeta(t *testing.T) {
	c := &Consul{log: zap.NewNop()}
	for _, tc := range []struct {
		meta map[string]string
		ok   bool
		want routing.Backend
	}{
		{map[string]string{}, true, routing.Backend{}},
		{map[string]string{MetaPOP3Port: "110", MetaSievePort: "4190", MetaLMTPPort: "24", MetaLMTPSecurity: "starttls"}, true,
			routing.Backend{POP3Addr: "10.0.0.1:110", SieveAddr: "10.0.0.1:4190", LMTPAddr: "10.0.0.1:24", LMTPSecurity: routing.SecurityStartTLS}},
		{map[string]string{MetaLMTPPort: "lmtp"}, false, routing.Backend{}},
		{map[string]string{MetaPOP3Port: "70000"}, false, routing.Backend{}},
		{map[string]string{MetaLMTPSecurity: "maybe"}, false, routing.Backend{}},
	} {
		b := &routing.Backend{ID: "x"}
		if ok := c.protocolAddrs(b, "10.0.0.1", tc.meta); ok != tc.ok {
			t.Errorf("%v: ok = %v", tc.meta, ok)
			continue
		}
		if tc.ok && !sameProtocolAddrs(b, &tc.want) {
			t.Errorf("%v: got %+v, want %+v", tc.meta, b, tc.want)
		}
	}
}
