package routing

import (
	"testing"

	"go.uber.org/zap"
)

func TestProtocolAddrsFromMeta(t *testing.T) {
	c := &Consul{log: zap.NewNop()}
	for _, tc := range []struct {
		meta map[string]string
		ok   bool
		want Backend
	}{
		{map[string]string{}, true, Backend{}},
		{map[string]string{MetaPOP3Port: "110", MetaSievePort: "4190", MetaLMTPPort: "24", MetaLMTPSecurity: "starttls"}, true,
			Backend{POP3Addr: "10.0.0.1:110", SieveAddr: "10.0.0.1:4190", LMTPAddr: "10.0.0.1:24", LMTPSecurity: SecurityStartTLS}},
		{map[string]string{MetaLMTPPort: "lmtp"}, false, Backend{}},
		{map[string]string{MetaPOP3Port: "70000"}, false, Backend{}},
		{map[string]string{MetaLMTPSecurity: "maybe"}, false, Backend{}},
	} {
		b := &Backend{ID: "x"}
		if ok := c.protocolAddrs(b, "10.0.0.1", tc.meta); ok != tc.ok {
			t.Errorf("%v: ok = %v", tc.meta, ok)
			continue
		}
		if tc.ok && !sameProtocolAddrs(b, &tc.want) {
			t.Errorf("%v: got %+v, want %+v", tc.meta, b, tc.want)
		}
	}
	if b := (&Backend{Addr: "a:143", LMTPAddr: "a:24"}); b.AddrFor(ProtocolIMAP) != "a:143" || b.AddrFor(ProtocolLMTP) != "a:24" || b.AddrFor(ProtocolPOP3) != "" {
		t.Errorf("AddrFor: %+v", b)
	}
	for _, s := range []string{"imap", "pop3", "sieve", "lmtp"} {
		if p, err := ParseProtocol(s); err != nil || p.String() != s {
			t.Errorf("ParseProtocol(%q) = %v, %v", s, p, err)
		}
	}
}
