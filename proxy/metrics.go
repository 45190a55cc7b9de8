package proxy

import "time"

// Metrics is told what sessions do, for counters and histograms. Methods
// are called on the session's goroutine and must be cheap and safe for
// concurrent use. Label values are bounded sets (listener names, backend
// IDs, the reasons below); user names never reach it.
type Metrics interface {
	// SessionState is called when a session enters a state (StatePreAuth,
	// StateLogin, StateSpliced) and with StateClosed at its end; from is
	// StateNone for a new session. backend is set from StateSpliced on.
	SessionState(listener, backend string, from, to State)
	// SessionEnded is called once per session with how it ended and the
	// bytes copied each way (in: client to backend).
	SessionEnded(listener, backend string, reason EndReason, in, out int64, d time.Duration)
	// PreAuthCommand counts pre-auth commands by name (unknown ones as
	// "other").
	PreAuthCommand(name string)
	// Login is called once per login attempt: result is "ok", "refused",
	// "unavailable" or "error"; reason says more in a few fixed words.
	Login(result, reason string)
	// BackendLogin reports the dial and the login exchange's durations;
	// ok means the backend answered the credentials (a NO included).
	BackendLogin(backend string, dial, login time.Duration, ok bool)
	// RouteLookup reports how long the router took.
	RouteLookup(d time.Duration, ok bool)
	// LimitHit counts a limit being reached ("connections",
	// "connections_per_ip", "line_length", "literal_size", "bad_commands",
	// "auth_failures", "auth_failure_rate", "user_slowdown",
	// "login_timeout", "preauth_idle").
	LimitHit(limit string)
}

type nopMetrics struct{}

func (nopMetrics) SessionState(_, _ string, _, _ State)                               {}
func (nopMetrics) SessionEnded(_, _ string, _ EndReason, _, _ int64, _ time.Duration) {}
func (nopMetrics) PreAuthCommand(string)                                              {}
func (nopMetrics) Login(_, _ string)                                                  {}
func (nopMetrics) BackendLogin(_ string, _, _ time.Duration, _ bool)                  {}
func (nopMetrics) RouteLookup(time.Duration, bool)                                    {}
func (nopMetrics) LimitHit(string)                                                    {}
