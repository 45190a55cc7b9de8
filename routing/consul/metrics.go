package consul

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// consulMetrics are the Consul router's Prometheus metrics. They exist
// (and are counted) whether or not a Registerer was given.
type consulMetrics struct {
	watchErrors *prometheus.CounterVec
	stale       *prometheus.CounterVec
	placements  *prometheus.CounterVec
	evictions   *prometheus.CounterVec
	users       prometheus.Gauge
	viewAge     prometheus.GaugeFunc
	// snapshotAge and degraded: see consul_snapshot.go.
	snapshotAge    prometheus.GaugeFunc
	degraded       prometheus.GaugeFunc
	snapshotWrites *prometheus.CounterVec
	// The change feed and the user cache (WatchFeed): see feed.go.
	feedGaps    prometheus.Counter
	feedResyncs prometheus.Counter
	verified    prometheus.Counter
	cacheMisses prometheus.Counter
	cached      prometheus.GaugeFunc
}

func newConsulMetrics(c *Consul) *consulMetrics {
	return &consulMetrics{
		watchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imapgate_consul_watch_errors_total",
			Help: "Failed Consul queries by watch (catalog, kv); the router keeps serving its last view.",
		}, []string{"watch"}),
		stale: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imapgate_consul_stale_answers_total",
			Help: "Consul answers from a server without a leader or lagging more than 5s, by watch.",
		}, []string{"watch"}),
		placements: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imapgate_consul_placements_total",
			Help: "Placements of users without a usable entry, by result: created, replaced (old backend gone), raced (another instance won), unrecorded (Consul unreachable), ratelimited, nobackend.",
		}, []string{"result"}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imapgate_consul_evicted_sessions_total",
			Help: "Sessions closed because their user moved (user) or their backend was gone past the grace (backend).",
		}, []string{"kind"}),
		users: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imapgate_consul_users",
			Help: "User entries in the router's view of Consul KV.",
		}),
		viewAge: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imapgate_consul_view_age_seconds",
			Help: "How long the view may have been out of date: 0 while Consul is reachable.",
		}, func() float64 { return c.ViewAge().Seconds() }),
		snapshotAge: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imapgate_consul_snapshot_age_seconds",
			Help: "Age of the snapshot the router serves from, having started while Consul was unreachable; 0 once Consul confirmed the view.",
		}, func() float64 { return c.SnapshotAge().Seconds() }),
		degraded: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imapgate_consul_degraded",
			Help: "1 while the router serves from a snapshot (started without Consul): known users route as before, new placements are not recorded.",
		}, func() float64 {
			if c.SnapshotAge() > 0 {
				return 1
			}
			return 0
		}),
		snapshotWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imapgate_consul_snapshot_writes_total",
			Help: "Writes of the router's snapshot file (consul.snapshot_file), by result: ok, error.",
		}, []string{"result"}),
		feedGaps: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imapgate_consul_feed_gaps_total",
			Help: "Times this instance missed more changes of a change-feed shard than the shard keeps (each is followed by a resync).",
		}),
		feedResyncs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imapgate_consul_feed_resyncs_total",
			Help: "Re-reads of the live users' entries after a gap in the change feed, a restored cluster or a start from a snapshot.",
		}),
		verified: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imapgate_consul_verified_users_total",
			Help: "Entries of live users re-read by the periodic check for changes nobody announced (users_watch = \"feed\", consul.verify_interval).",
		}),
		cacheMisses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imapgate_consul_user_reads_total",
			Help: "Consistent reads of one user's entry at a login the user cache could not answer (users_watch = \"feed\").",
		}),
		cached: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imapgate_consul_cached_users",
			Help: "User entries in the user cache (users_watch = \"feed\"), tombstones included.",
		}, func() float64 {
			if c.cache == nil {
				return 0
			}
			return float64(c.cache.len())
		}),
	}
}

func (m *consulMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.watchErrors, m.stale, m.placements, m.evictions, m.users, m.viewAge, m.snapshotAge, m.degraded, m.snapshotWrites,
		m.feedGaps, m.feedResyncs, m.verified, m.cacheMisses, m.cached}
}

func (m *consulMetrics) register(r prometheus.Registerer) error {
	var errs []error
	for _, col := range m.collectors() {
		errs = append(errs, r.Register(col))
	}
	if err := errors.Join(errs...); err != nil {
		m.unregister(r)
		return err
	}
	return nil
}

func (m *consulMetrics) unregister(r prometheus.Registerer) {
	if r == nil {
		return
	}
	for _, col := range m.collectors() {
		r.Unregister(col)
	}
}
