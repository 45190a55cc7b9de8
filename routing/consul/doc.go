// Package consul is the Consul router: placements of users on backends
// kept in Consul's KV store, backends found in its catalog, and the
// registration of an imapgate instance as a Consul service. It implements
// routing.Router, routing.Committer and routing.Operator, and is the only
// package of the routing room that imports Consul's API or Prometheus; the
// proxy depends on the routing package's interfaces alone.
//
// How it behaves under failure (Consul down at start or later, a leader
// lost, placement races between instances) is in ../README.md.
package consul
