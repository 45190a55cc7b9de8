package proxy

import (
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/routing"
)

// TestDovecotSlowWrongPassword logs in with wrong passwords through
// imapgate to a real Dovecot that delays its NO (auth_failure_delay, and
// its auth penalty, which grows with each failure from the client's
// address) for longer than imapgate's setup timeout: the client must get
// Dovecot's AUTHENTICATIONFAILED, not UNAVAILABLE, and imapgate's own
// failure delay must overlap Dovecot's rather than add to it.
func TestDovecotSlowWrongPassword(t *testing.T) {
	testenv.Need(t, "dovecot")
	d := testenv.StartDovecot(t, testenv.DovecotOptions{
		TrustedNetworks: "127.0.0.0/8",
		Extra:           "auth_failure_delay = 2s\n",
	})
	const ours = 1500 * time.Millisecond
	h := newHarness(t, fixedRouter(dovecotBackend(d, routing.SecurityNone)), func(o *Options) {
		o.Timeouts.BackendLogin = 500 * time.Millisecond
		o.Limits.AuthFailureDelay = ours
	})
	c := dialConv(t, h.tlsAddr, h.clientTLS)
	c.Expect("* OK")
	t0 := time.Now()
	c.Send("a LOGIN alice@example.org wrong\r\n")
	c.Expect("a NO [AUTHENTICATIONFAILED]")
	took := time.Since(t0)
	t.Logf("wrong password answered after %v (Dovecot's delay 2s, imapgate's %v)", took, ours)
	if took < time.Second {
		t.Fatalf("Dovecot answered within %v: the test does not exercise a slow NO", took)
	}
	// Dovecot's 2 s and ours overlap: added up they would be 3.5 s.
	if took > 3*time.Second {
		t.Errorf("the NO took %v: imapgate's failure delay was added to Dovecot's", took)
	}
	c.Send("b LOGIN alice@example.org alicepass\r\n")
	c.Expect("b OK")
}
