package consul

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/imapgate/imapgate/internal/testenv"
)

// benchConsul starts Consul with four backends and n users placed
// round-robin, written 64 to a transaction (Consul's limit).
func benchConsul(b *testing.B, n int) (*testenv.Consul, []string) {
	c := testenv.StartConsul(b)
	client := newAPIClient(b, c.HTTPAddr)
	for i := range 4 {
		err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{
			ID: fmt.Sprintf("imap%d", i), Name: testService, Address: "127.0.0.1", Port: 1143 + i,
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	names := make([]string, n)
	var ops api.TxnOps
	flush := func() {
		ok, resp, _, err := client.Txn().Txn(ops, nil)
		if err != nil || !ok {
			b.Fatalf("txn: %v %v", err, resp)
		}
		ops = ops[:0]
	}
	for i := range n {
		names[i] = fmt.Sprintf("user%06d@example.org", i)
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{
			Verb: api.KVSet, Key: "imapgate/users/" + names[i], Value: []byte(fmt.Sprintf("imap%d", i%4)),
		}})
		if len(ops) == 64 {
			flush()
		}
	}
	if len(ops) > 0 {
		flush()
	}
	return c, names
}

// BenchmarkConsulRoute measures Route for known users with 100,000 users
// in the view, loaded from a real Consul, and reports the p50/p99 of
// single lookups (latency) as well as ns/op (throughput). The parent
// The throughput run also reports how long NewConsul took to load the view.
func BenchmarkConsulRoute(b *testing.B) {
	const users = 100000
	c, names := benchConsul(b, users)

	start := time.Now()
	r, err := NewConsul(context.Background(), ConsulConfig{Address: c.HTTPAddr, Service: testService})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	load := time.Since(start)
	if n := len(r.view.Load().users); n != users {
		b.Fatalf("view has %d users, want %d", n, users)
	}

	ctx := context.Background()
	b.Logf("NewConsul loaded %d users in %v", users, load)
	b.Run("throughput", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := r.Route(ctx, names[i%users]); err != nil {
				b.Fatal(err)
			}
			i += 7919 // a prime stride: scattered over the map like real logins
		}
		b.ReportMetric(load.Seconds()*1000, "view-load-ms")
	})
	b.Run("parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if _, err := r.Route(ctx, names[i%users]); err != nil {
					b.Error(err)
					return
				}
				i += 7919
			}
		})
	})
	b.Run("latency", func(b *testing.B) {
		// Each lookup timed alone; time.Now costs ~100ns on a VM, included.
		lat := make([]time.Duration, 0, 1<<20)
		i := 0
		for b.Loop() {
			t0 := time.Now()
			if _, err := r.Route(ctx, names[i%users]); err != nil {
				b.Fatal(err)
			}
			if len(lat) < cap(lat) {
				lat = append(lat, time.Since(t0))
			}
			i += 7919
		}
		slices.Sort(lat)
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
		b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
		b.ReportMetric(float64(lat[len(lat)-1].Nanoseconds()), "max-ns")
	})
}

// BenchmarkConsulKVRefresh measures what every change under the prefix
// (a new user's placement, a move) costs each imapgate instance with
// 100,000 users: one listing of the whole prefix, decoded and diffed.
func BenchmarkConsulKVRefresh(b *testing.B) {
	const users = 100000
	c, _ := benchConsul(b, users)
	r, err := NewConsul(context.Background(), ConsulConfig{Address: c.HTTPAddr, Service: testService})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	b.ReportAllocs()
	cpu0 := cpuTime(b)
	for b.Loop() {
		if _, err := r.fetchKV(ctx, kvUsers, 0); err != nil {
			b.Fatal(err)
		}
	}
	// Consul runs in another process: our CPU time is the client's share.
	b.ReportMetric(float64((cpuTime(b)-cpu0).Milliseconds())/float64(b.N), "client-cpu-ms/op")

	// The size of one listing as sent (gzip, as the api client asks) and
	// decompressed.
	for _, enc := range []string{"gzip", "identity"} {
		req, _ := http.NewRequest("GET", "http://"+c.HTTPAddr+"/v1/kv/imapgate/users/?recurse&stale", nil)
		req.Header.Set("Accept-Encoding", enc)
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		b.ReportMetric(float64(n)/1e6, "MB-"+enc)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkConsulRouteFeed is BenchmarkConsulRoute with users_watch =
// "feed": 20,000 users, every one read once (the cache miss) before the
// timed lookups, which then answer from the bounded cache.
func BenchmarkConsulRouteFeed(b *testing.B) {
	const users = 20000
	c, names := benchConsul(b, users)
	r, err := NewConsul(context.Background(), ConsulConfig{Address: c.HTTPAddr, Service: testService, UsersWatch: WatchFeed})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	start := time.Now()
	for _, u := range names {
		if _, err := r.Route(ctx, u); err != nil {
			b.Fatal(err)
		}
	}
	miss := time.Since(start) / users
	b.Run("throughput", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := r.Route(ctx, names[i%users]); err != nil {
				b.Fatal(err)
			}
			i += 7919
		}
		b.ReportMetric(float64(miss.Microseconds()), "miss-us")
	})
	b.Run("parallel", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if _, err := r.Route(ctx, names[i%users]); err != nil {
					b.Error(err)
					return
				}
				i += 7919
			}
		})
	})
}
