package main

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/imapgate/imapgate/proxy"
	"go.uber.org/zap"
)

// drainText is what drained clients read before the close.
const drainText = "Server shutting down, please reconnect"

// shutdown drains the process:
//
//  1. /readyz answers 503 and the Consul registration is removed, so load
//     balancers and DNS stop sending clients here;
//  2. the listeners close (a second imapgate bound with SO_REUSEPORT takes
//     the new connections) and sessions not yet logged in get BYE;
//  3. spliced sessions are closed one by one, spread over the drain
//     window with jitter, so that a hundred thousand clients do not all
//     reconnect to the other instances in the same second;
//  4. whatever is still open a grace period after the window (a login in
//     flight that became a session late, a client that does not read) is
//     closed at once.
func (a *app) shutdown() {
	cfg := a.cfg.Load()
	start := time.Now()
	a.draining.Store(true)
	a.deregister()
	window, grace := cfg.Shutdown.Times()
	a.log.Info("draining", zap.Duration("drain_window", window), zap.Duration("grace", grace))

	ctx, cancel := context.WithDeadline(context.Background(), start.Add(window+grace))
	defer cancel()
	go func() {
		select {
		case <-a.force:
			cancel() // Shutdown then closes whatever is left
		case <-ctx.Done():
		}
	}()
	done := make(chan error, 1)
	go func() { done <- a.srv.Shutdown(ctx) }()

	first := a.srv.Spliced()
	seen := make(map[string]bool, len(first))
	for _, s := range first {
		seen[s.Info().ID] = true
	}
	closed := paceClose(ctx, first, start, window, nil)
	// Sessions that finished logging in after the first look. (A closed
	// session is still listed until its goroutine has finished with it.)
	if ctx.Err() == nil {
		for _, s := range a.srv.Spliced() {
			if !seen[s.Info().ID] {
				s.Close(drainText)
				closed++
			}
		}
	}
	err := <-done
	a.serveWG.Wait()
	fields := []zap.Field{zap.Int("closed", closed), zap.Duration("took", time.Since(start).Round(time.Millisecond))}
	forced := false
	select {
	case <-a.force:
		forced = true
	default:
	}
	switch {
	case forced:
		a.log.Warn("drain cut short, closed the remaining sessions", fields...)
	case err != nil:
		a.log.Warn("grace period over, closed the remaining sessions", fields...)
	default:
		a.log.Info("drained", fields...)
	}
	if a.http != nil {
		hctx, hcancel := context.WithTimeout(context.Background(), 2*time.Second)
		a.http.Shutdown(hctx)
		hcancel()
	}
}

// paceClose closes sessions spread over [start, start+window): session i
// of n closes at a random moment inside the i-th of n equal slots, in a
// random order. That is as even as a uniform spread can be (no two closes
// share a slot, no burst at the start) while no two imapgates draining
// together line up. It returns how many it closed; sessions that ended by
// themselves meanwhile cost nothing. sleep is time.Sleep's stand-in for
// tests (nil: a timer that ctx can cut short).
func paceClose(ctx context.Context, ss []proxy.Spliced, start time.Time, window time.Duration, sleep func(time.Duration)) int {
	n := len(ss)
	if n == 0 {
		return 0
	}
	rand.Shuffle(n, func(i, j int) { ss[i], ss[j] = ss[j], ss[i] })
	at := make([]time.Duration, n)
	slot := window / time.Duration(n)
	for i := range at {
		at[i] = time.Duration(i)*slot + rand.N(max(slot, 1))
	}
	slices.Sort(at) // already ordered by slot; jitter never crosses slots
	if sleep == nil {
		timer := time.NewTimer(0)
		defer timer.Stop()
		<-timer.C
		sleep = func(d time.Duration) {
			timer.Reset(d)
			select {
			case <-timer.C:
			case <-ctx.Done():
			}
		}
	}
	// Closing takes a little time of its own; batching the closes that are
	// due keeps a large drain on schedule without a timer per session.
	// A close writes BYE, which can block for a second on a client that
	// does not read: each runs on its own goroutine so the schedule holds.
	const tick = 5 * time.Millisecond
	var wg sync.WaitGroup
	defer wg.Wait()
	for i := 0; i < n; {
		if ctx.Err() != nil {
			return i
		}
		now := time.Since(start)
		for i < n && at[i] <= now {
			s := ss[i]
			wg.Go(func() { s.Close(drainText) })
			i++
		}
		if i < n {
			sleep(max(at[i]-time.Since(start), tick))
		}
	}
	return n
}
