package routing

import "testing"

func TestProtocolAddrFor(t *testing.T) {
	if b := (&Backend{Addr: "a:143", LMTPAddr: "a:24"}); b.AddrFor(ProtocolIMAP) != "a:143" || b.AddrFor(ProtocolLMTP) != "a:24" || b.AddrFor(ProtocolPOP3) != "" {
		t.Errorf("AddrFor: %+v", b)
	}
	for _, s := range []string{"imap", "pop3", "sieve", "lmtp"} {
		if p, err := ParseProtocol(s); err != nil || p.String() != s {
			t.Errorf("ParseProtocol(%q) = %v, %v", s, p, err)
		}
	}
}
