package consul

import (
	"net"
	"strconv"

	"go.uber.org/zap"

	"github.com/imapgate/imapgate/routing"
)

// Service Meta keys for the other protocols of a Consul backend instance:
// the port of each on the service's own address. A missing key means the
// backend does not serve that protocol.
const (
	MetaPOP3Port     = "imapgate-pop3-port"
	MetaSievePort    = "imapgate-sieve-port"
	MetaLMTPPort     = "imapgate-lmtp-port"
	MetaLMTPSecurity = "imapgate-lmtp-security" // "none" (default), "tls" or "starttls"
)

// protocolAddrs fills b's per-protocol addresses from a service's Meta.
// A bad value skips the backend (logged), as a bad security does.
func (c *Consul) protocolAddrs(b *routing.Backend, host string, meta map[string]string) bool {
	for _, f := range []struct {
		key string
		dst *string
	}{{MetaPOP3Port, &b.POP3Addr}, {MetaSievePort, &b.SieveAddr}, {MetaLMTPPort, &b.LMTPAddr}} {
		v := meta[f.key]
		if v == "" {
			continue
		}
		port, err := strconv.Atoi(v)
		if err != nil || port <= 0 || port > 65535 {
			c.log.Error("bad "+f.key+" in service meta (want a port number); backend skipped",
				zap.String("backend", b.ID), zap.String("value", v))
			return false
		}
		*f.dst = net.JoinHostPort(host, strconv.Itoa(port))
	}
	sec, err := routing.ParseSecurity(meta[MetaLMTPSecurity])
	if err != nil {
		c.log.Error("bad "+MetaLMTPSecurity+" in service meta; backend skipped", zap.String("backend", b.ID), zap.Error(err))
		return false
	}
	b.LMTPSecurity = sec
	return true
}

func sameProtocolAddrs(a, b *routing.Backend) bool {
	return a.POP3Addr == b.POP3Addr && a.SieveAddr == b.SieveAddr && a.LMTPAddr == b.LMTPAddr && a.LMTPSecurity == b.LMTPSecurity
}
