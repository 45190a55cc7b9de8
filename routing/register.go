package routing

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/hashicorp/consul/api"
)

// RegisterConfig describes the imapgate instance to register in Consul, so
// that DNS (imap.imapgate.service.consul) or an L4 balancer finds the
// healthy proxies.
type RegisterConfig struct {
	// Name is the service name, e.g. "imapgate". Required.
	Name string
	// ID identifies this instance, e.g. "imapgate-" + hostname; it must be
	// unique on its Consul agent. Required.
	ID string
	// Address is the address clients should dial. Empty means the
	// agent's node address.
	Address string
	// Ports are the listeners by name, e.g. {"imap": 143, "imaps": 993}.
	// Each becomes one service instance with ID "<ID>-<name>" tagged with
	// its name, so "imaps.imapgate.service.consul" resolves to the 993s.
	// At least one.
	Ports map[string]int
	// Tags are added to every instance.
	Tags []string
	// Meta is added to every instance.
	Meta map[string]string
	// CheckHTTP is the URL of imapgate's health endpoint that the agent
	// polls, e.g. "http://127.0.0.1:8080/healthz". Required: an instance
	// nobody checks stays "passing" after a crash.
	CheckHTTP string
	// Interval between checks. Zero means 10s.
	Interval time.Duration
	// Timeout of one check. Zero means Interval, capped at 5s.
	Timeout time.Duration
	// DeregisterAfter makes the agent remove instances whose check has
	// been critical this long (imapgate died without deregistering). Zero
	// means 10 minutes; negative means never.
	DeregisterAfter time.Duration
}

// Register registers one service instance per port with the local agent
// and returns the function that deregisters them, to call on shutdown. If
// one registration fails, the ones already made are undone.
func Register(ctx context.Context, client *api.Client, cfg RegisterConfig) (deregister func(context.Context) error, err error) {
	switch {
	case client == nil:
		return nil, errors.New("routing: register: nil consul client")
	case cfg.Name == "" || cfg.ID == "":
		return nil, errors.New("routing: register: name and ID are required")
	case len(cfg.Ports) == 0:
		return nil, errors.New("routing: register: no ports")
	case cfg.CheckHTTP == "":
		return nil, errors.New("routing: register: no health check URL")
	}
	interval := cfg.Interval
	if interval <= 0 {
		interval = 10 * time.Second
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = min(interval, 5*time.Second)
	}
	check := &api.AgentServiceCheck{
		HTTP:     cfg.CheckHTTP,
		Interval: interval.String(),
		Timeout:  timeout.String(),
	}
	switch {
	case cfg.DeregisterAfter == 0:
		check.DeregisterCriticalServiceAfter = (10 * time.Minute).String()
	case cfg.DeregisterAfter > 0:
		check.DeregisterCriticalServiceAfter = cfg.DeregisterAfter.String()
	}

	agent := client.Agent()
	var ids []string
	deregister = func(ctx context.Context) error {
		var errs []error
		for _, id := range ids {
			if err := agent.ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
				errs = append(errs, fmt.Errorf("routing: deregister %q: %w", id, err))
			}
		}
		return errors.Join(errs...)
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Ports)) {
		port := cfg.Ports[name]
		if port <= 0 || port > 65535 {
			return nil, errors.Join(fmt.Errorf("routing: register: bad port %d for %q", port, name), deregister(ctx))
		}
		reg := &api.AgentServiceRegistration{
			ID:      cfg.ID + "-" + name,
			Name:    cfg.Name,
			Address: cfg.Address,
			Port:    port,
			Tags:    append([]string{name}, cfg.Tags...),
			Meta:    cfg.Meta,
			Check:   check,
		}
		opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx)
		if err := agent.ServiceRegisterOpts(reg, opts); err != nil {
			return nil, errors.Join(fmt.Errorf("routing: register %q in consul: %w", reg.ID, err), deregister(ctx))
		}
		ids = append(ids, reg.ID)
	}
	return deregister, nil
}
