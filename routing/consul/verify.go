package consul

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// verifyLoop is the change feed's safety net (WatchFeed only). The feed
// hears of every change imapgate makes, but not of a `consul kv put` or
// `delete` an operator forgot to announce, nor of one made by an older
// imapgate that does not write the feed. So once every VerifyInterval it
// re-reads the entries of the users this instance must keep right (live
// sessions, unrecorded routes) and evicts as for any change: a change
// nobody announced splits a user for at most that long, not for ever.
//
// The reads are spread over half the interval, txnMaxOps at a time, so
// that 10,000 live users with the default 10 minutes cost Consul about 17
// single-key reads a second per instance; a failed batch ends the round
// (logged) and the next round starts again from the beginning.
func (c *Consul) verifyLoop(ctx context.Context) {
	defer c.wg.Done()
	every := c.cfg.VerifyInterval
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		live := c.liveUsers()
		users := make([]string, 0, len(live))
		for u := range live {
			users = append(users, u)
		}
		batches := (len(users) + txnMaxOps - 1) / txnMaxOps
		if batches == 0 {
			continue
		}
		gap := every / 2 / time.Duration(batches)
		start, read := time.Now(), 0
		for len(users) > 0 {
			n := min(len(users), txnMaxOps)
			if err := c.refreshUsers(ctx, users[:n]); err != nil {
				if ctx.Err() == nil {
					c.metrics.watchErrors.WithLabelValues("verify").Inc()
					c.log.Warn("verifying the cached placements failed; next round in "+every.String(), zap.Int("read", read), zap.Error(err))
				}
				break
			}
			read += n
			users = users[n:]
			if len(users) > 0 && !sleepCtx(ctx, gap) {
				return
			}
		}
		c.metrics.verified.Add(float64(read))
		c.log.Debug("cached placements verified", zap.Int("users", read), zap.Duration("took", time.Since(start)))
	}
}
