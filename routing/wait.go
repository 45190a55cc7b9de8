package routing

import (
	"context"
	"time"
)

// WaitFor calls cond every interval until it is true or ctx ends, and
// returns ctx's error in that case: how an operator's move or drain waits
// for the sessions and the views it changed to catch up.
func WaitFor(ctx context.Context, interval time.Duration, cond func() bool) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}
