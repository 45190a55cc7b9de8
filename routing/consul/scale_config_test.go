package consul

import (
	"os"

	"github.com/imapgate/imapgate/routing"
)

// scaleConfig is the router configuration TestScale runs with: the change
// feed, unless IMAPGATE_SCALE_WATCH=full.
func scaleConfig(addr string, ev routing.Evictor) ConsulConfig {
	w := WatchFeed
	if os.Getenv("IMAPGATE_SCALE_WATCH") == "full" {
		w = WatchFull
	}
	return ConsulConfig{Address: addr, Service: testService, Evictor: ev, PlaceRate: 1000, UsersWatch: w}
}
