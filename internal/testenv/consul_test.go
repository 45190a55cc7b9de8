package testenv

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func consulClient(t testing.TB, c *Consul) *api.Client {
	t.Helper()
	cl, err := api.NewClient(&api.Config{Address: c.HTTPAddr})
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

func TestConsulKVSurvivesRestart(t *testing.T) {
	c := StartConsul(t)
	kv := consulClient(t, c).KV()

	if _, err := kv.Put(&api.KVPair{Key: "imapgate/users/alice@example.org", Value: []byte("backend-1")}, nil); err != nil {
		t.Fatalf("put: %v\n%s", err, c.Log())
	}
	pair, _, err := kv.Get("imapgate/users/alice@example.org", nil)
	if err != nil || pair == nil || string(pair.Value) != "backend-1" {
		t.Fatalf("get: %v %+v", err, pair)
	}

	c.Stop(t)
	c.Stop(t) // idempotent
	if _, _, err := kv.Get("imapgate/users/alice@example.org", nil); err == nil {
		t.Fatal("KV answers while Consul is stopped")
	}

	c.Start(t)
	leader, err := consulClient(t, c).Status().Leader()
	if err != nil || leader == "" {
		t.Fatalf("leader after restart: %q, %v", leader, err)
	}
	pair, _, err = kv.Get("imapgate/users/alice@example.org", &api.QueryOptions{RequireConsistent: true})
	if err != nil || pair == nil || string(pair.Value) != "backend-1" {
		t.Fatalf("KV after restart: %v %+v", err, pair)
	}
	if _, err := kv.Put(&api.KVPair{Key: "imapgate/after", Value: []byte("x")}, nil); err != nil {
		t.Fatalf("put after restart: %v", err)
	}
}

func TestConsulCatalogAndDNS(t *testing.T) {
	c := StartConsul(t)
	cl := consulClient(t, c)
	reg := &api.AgentServiceRegistration{ID: "imap-1", Name: "imap", Address: "127.0.0.1", Port: 143}
	if err := cl.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		svcs, _, err := cl.Catalog().Service("imap", "", nil)
		if err == nil && len(svcs) == 1 && svcs[0].ServicePort == 143 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("service not in catalog: %v %+v", err, svcs)
		}
		time.Sleep(100 * time.Millisecond)
	}

	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, c.DNSAddr)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, srvs, err := r.LookupSRV(ctx, "", "", "imap.service.consul")
	if err != nil || len(srvs) != 1 || srvs[0].Port != 143 {
		t.Fatalf("SRV lookup via %s: %v %+v", c.DNSAddr, err, srvs)
	}
}

func TestTwoConsuls(t *testing.T) {
	a, b := StartConsul(t), StartConsul(t)
	if a.HTTPAddr == b.HTTPAddr {
		t.Fatal("same port")
	}
	if _, err := consulClient(t, a).KV().Put(&api.KVPair{Key: "k", Value: []byte("a")}, nil); err != nil {
		t.Fatal(err)
	}
	if p, _, err := consulClient(t, b).KV().Get("k", nil); err != nil || p != nil {
		t.Fatalf("b sees a's key: %v %+v", err, p)
	}
}
