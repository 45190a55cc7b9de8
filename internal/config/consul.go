package config

import (
	"fmt"
	"net"
	"os"

	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	"github.com/imapgate/imapgate/routing/consul"
)

// ConsulRouter maps [consul] (and [backend]'s TLS template) onto the
// Consul router's configuration. Evictor, Logger and Registerer are the
// caller's to set.
func (c *Config) ConsulRouter() (consul.ConsulConfig, error) {
	bt, err := c.BackendTLS()
	if err != nil {
		return consul.ConsulConfig{}, err
	}
	watch, err := consul.ParseUsersWatch(c.Consul.UsersWatch)
	if err != nil {
		return consul.ConsulConfig{}, fmt.Errorf("consul.users_watch: %w", err)
	}
	return consul.ConsulConfig{
		Address:        c.Consul.Address,
		Token:          c.Consul.Token,
		Datacenter:     c.Consul.Datacenter,
		Service:        c.Consul.Service,
		Tag:            c.Consul.Tag,
		Prefix:         c.Consul.Prefix,
		BackendTLS:     bt,
		Grace:          c.Consul.Grace.D(),
		PlaceRate:      c.Consul.PlaceRate,
		MoveHold:       c.Consul.MoveHold.D(),
		UsersWatch:     watch,
		CacheSize:      c.Consul.CacheSize,
		VerifyInterval: c.Consul.VerifyInterval.D(),
		// A start while Consul is unreachable serves from this.
		SnapshotFile:   c.Consul.SnapshotPath(),
		SnapshotMaxAge: c.Consul.SnapshotMaxAge.D(),
	}, nil
}

// Registration maps [consul.register] onto imapgate's own service
// registration: one port per listener (bound holds the addresses
// actually bound, in the order of listeners: ":0" in tests), and an HTTP
// check on /readyz of the admin listener (httpAddr, nil if off) unless
// check_http says otherwise. ok is false when registration is off.
func (c *Config) Registration(listeners []ListenerSpec, bound []net.Addr, httpAddr net.Addr) (reg consul.RegisterConfig, ok bool) {
	rc := c.Consul.Register
	if !rc.Enable {
		return reg, false
	}
	ports := map[string]int{}
	for i, sp := range listeners {
		name := registrationName(sp)
		if _, dup := ports[name]; dup {
			name = sp.Listener.Name
		}
		ports[name] = bound[i].(*net.TCPAddr).Port
	}
	reg = consul.RegisterConfig{Name: rc.Name, ID: rc.ID, Address: rc.Address, Ports: ports, Tags: rc.Tags, CheckHTTP: rc.CheckHTTP}
	if reg.ID == "" {
		host, _ := os.Hostname()
		reg.ID = "imapgate-" + host
	}
	if reg.Name == "" {
		reg.Name = "imapgate"
	}
	if reg.CheckHTTP == "" && httpAddr != nil {
		reg.CheckHTTP = "http://" + httpAddr.String() + "/readyz"
	}
	return reg, true
}

// registrationName is a listener's name (and tag) in the registration:
// imap or imaps, pop3 or pop3s, sieve, lmtp.
func registrationName(sp ListenerSpec) string {
	name := sp.Listener.Protocol.String()
	if sp.Listener.Protocol == routing.ProtocolIMAP || sp.Listener.Protocol == routing.ProtocolPOP3 {
		if sp.Listener.Mode == proxy.ImplicitTLS {
			name += "s"
		}
	}
	return name
}
