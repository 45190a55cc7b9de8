package consul

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"
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

// Registration is this imapgate instance registered in Consul. Keep puts
// the registration back when it goes missing; Deregister removes it once.
type Registration struct {
	client *api.Client
	cfg    RegisterConfig
	log    *zap.Logger

	mu    sync.Mutex
	dereg func(context.Context) error // nil once deregistered
}

// NewRegistration registers cfg (see Register) and returns the
// registration. log may be nil.
func NewRegistration(ctx context.Context, client *api.Client, cfg RegisterConfig, log *zap.Logger) (*Registration, error) {
	if log == nil {
		log = zap.NewNop()
	}
	dereg, err := Register(ctx, client, cfg)
	if err != nil {
		return nil, err
	}
	return &Registration{client: client, cfg: cfg, log: log, dereg: dereg}, nil
}

// Keep checks every interval that the registration is still there and
// registers again when it is not, until ctx ends or Deregister is called:
// after a zero-downtime upgrade the old process deregisters the service
// ID that the new one shares, and an agent that lost its state forgets
// it too.
func (r *Registration) Keep(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.mu.Lock()
		gone := r.dereg == nil
		r.mu.Unlock()
		if gone {
			return
		}
		if r.missing(ctx) {
			r.log.Info("consul registration missing, registering again", zap.String("id", r.cfg.ID))
			if _, err := Register(ctx, r.client, r.cfg); err != nil {
				r.log.Warn("consul re-registration failed", zap.Error(err))
			}
		}
	}
}

func (r *Registration) missing(ctx context.Context) bool {
	for name := range r.cfg.Ports {
		s, _, err := r.client.Agent().Service(r.cfg.ID+"-"+name, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			// 404 is "missing"; anything else (agent down) is not ours to fix.
			var se api.StatusError
			return errors.As(err, &se) && se.Code == http.StatusNotFound
		}
		if s == nil {
			return true
		}
	}
	return false
}

// Deregister removes the registration; later calls do nothing.
func (r *Registration) Deregister(ctx context.Context) error {
	r.mu.Lock()
	dereg := r.dereg
	r.dereg = nil
	r.mu.Unlock()
	if dereg == nil {
		return nil
	}
	return dereg(ctx)
}

// ConsulClientConfig says how to reach Consul. Zero values mean the
// environment's (api.DefaultConfig: CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN,
// CONSUL_CACERT, CONSUL_HTTP_SSL…), else 127.0.0.1:8500, no token, the
// agent's datacenter.
type ConsulClientConfig struct {
	Address    string
	Token      string
	Datacenter string
}

// NewConsulClient is the one place imapgate builds a Consul client (the
// router, the registration, the drain writes and the tls package's
// certificate storage all use it). The transport is returned so that the
// owner can close its idle connections.
func NewConsulClient(cfg ConsulClientConfig) (*api.Client, *http.Transport, error) {
	ac := api.DefaultConfig()
	if cfg.Address != "" {
		ac.Address = cfg.Address
	}
	if cfg.Token != "" {
		ac.Token = cfg.Token
	}
	if cfg.Datacenter != "" {
		ac.Datacenter = cfg.Datacenter
	}
	client, err := api.NewClient(ac)
	if err != nil {
		return nil, nil, fmt.Errorf("routing: consul client: %w", err)
	}
	return client, ac.Transport, nil
}
