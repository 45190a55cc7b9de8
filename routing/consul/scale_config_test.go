package consul

import "github.com/imapgate/imapgate/routing"

// scaleConfig is the router configuration TestScale runs with.
func scaleConfig(addr string, ev routing.Evictor) ConsulConfig {
	return ConsulConfig{Address: addr, Service: testService, Evictor: ev, PlaceRate: 1000}
}
