package config

import (
	"errors"
	"fmt"

	igtls "github.com/imapgate/imapgate/tls"
)

// UsesACME reports whether certificates come from an ACME CA: names to
// obtain, or names allowed on demand.
func (t *TLS) UsesACME() bool {
	return len(t.ACME.Names) > 0 || len(t.ACME.OnDemandAllow) > 0
}

// TLSOptions maps [tls] onto the tls package's configuration.
func (c *Config) TLSOptions() igtls.Config {
	t := c.TLS
	o := igtls.Config{
		SelfSigned:   igtls.SelfSignedConfig{Names: t.SelfSigned, Disable: t.NoSelfSigned},
		MinVersion:   t.MinVersion,
		CipherSuites: t.CipherSuites,
	}
	for _, cf := range t.Certificates {
		o.Certificates = append(o.Certificates, igtls.CertFile{CertFile: cf.Cert, KeyFile: cf.Key})
	}
	if !t.UsesACME() {
		return o
	}
	a := t.ACME
	o.ACME = igtls.ACMEConfig{
		Names:               a.Names,
		DirectoryURL:        a.Directory,
		Email:               a.Email,
		CARootFile:          a.CARoot,
		HTTP01:              igtls.HTTP01Config{Disable: a.NoHTTP01, Addr: a.HTTP01Addr},
		TLSALPN01:           igtls.TLSALPN01Config{Disable: a.NoTLSALPN01, Port: a.TLSALPN01Port},
		DisableOCSPStapling: a.NoOCSPStapling,
		Storage:             igtls.StorageConfig{Kind: a.Storage.kind(), Dir: a.StorageDir},
		RenewalWindowRatio:  a.RenewalWindowRatio,
		RenewCheckInterval:  a.RenewCheckInterval.D(),
	}
	if len(a.OnDemandAllow) > 0 {
		o.ACME.OnDemand = &igtls.OnDemandConfig{Allow: a.OnDemandAllow}
	}
	if a.Storage == StorageConsul {
		o.ACME.Storage.Consul = igtls.ConsulStorageConfig{
			Address:    c.Consul.Address,
			Token:      c.Consul.Token,
			Datacenter: c.Consul.Datacenter,
			Prefix:     a.ConsulPrefix,
		}
	}
	return o
}

// TicketKeys maps [tls.session_tickets] onto the tls package's ticket
// key sharing; the caller sets Apply. The store it names is resolved
// here: in auto mode Consul KV when the Consul router or ACME storage is
// configured, else the file if one is set. store is the store chosen,
// for the log; TicketsOff (with a zero config) means nothing is shared.
// auto says the store was not named, so that a store that cannot be used
// is the caller's warning rather than a start-up error.
func (c *Config) TicketKeys() (cfg igtls.TicketKeysConfig, store TicketStore, auto bool, err error) {
	st := c.TLS.SessionTickets
	store, auto = st.Store, st.Store == TicketsAuto
	if auto {
		switch {
		case c.Routing.Router == RouterConsul || c.TLS.ACME.Storage == StorageConsul:
			store = TicketsConsul
		case st.File != "":
			store = TicketsFile
		default:
			store = TicketsOff
		}
	}
	cfg = igtls.TicketKeysConfig{Rotation: st.Rotation.D(), Keep: st.Keep}
	switch store {
	case TicketsOff:
		return igtls.TicketKeysConfig{}, store, auto, nil
	case TicketsFile:
		if st.File == "" {
			return cfg, store, auto, errors.New("tls.session_tickets: store = \"file\" needs file")
		}
		cfg.Store = &igtls.FileTicketStore{Path: st.File}
	case TicketsConsul:
		client, err := c.ConsulClient()
		if err != nil {
			return cfg, store, auto, fmt.Errorf("tls.session_tickets: %w", err)
		}
		key := st.ConsulKey
		if key == "" {
			key = igtls.DefaultConsulTicketKey
		}
		cfg.Store = &igtls.ConsulTicketStore{KV: client.KV(), Key: key}
	}
	return cfg, store, auto, nil
}
