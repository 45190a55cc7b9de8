package proxy

// This file names a session's states and the ways a session ends, for
// the session itself, its summary line, SessionInfo and Metrics.

// State is where a session is in its life (README.md, "The life of a
// session"). Metrics.SessionState is told every change.
type State uint8

const (
	// StateNone is no state yet: the from of a new session's first change.
	StateNone State = iota
	// StatePreAuth: greeted, answering commands before a login.
	StatePreAuth
	// StateLogin: a login is routed and on its way to the backend.
	StateLogin
	// StateSpliced: logged in; the splice carries every byte.
	StateSpliced
	// StateClosed: over.
	StateClosed
)

var stateNames = [...]string{
	StateNone:    "",
	StatePreAuth: "preauth",
	StateLogin:   "login",
	StateSpliced: "spliced",
	StateClosed:  "closed",
}

// String is the state's name in metrics labels, logs and SessionInfo.
func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// EndReason is how a session ended: the "end" field of its summary line
// and Metrics.SessionEnded's reason, a small fixed set. The first reason
// set wins: a session kicked for a move that then sees its socket closed
// ended "moved". The zero value means the session has not ended.
type EndReason string

// How a session ends before the splice.
const (
	// EndLogout: the client logged out (LOGOUT, QUIT).
	EndLogout EndReason = "logout"
	// EndTLSHandshake: the client's TLS handshake (implicit or STARTTLS)
	// failed.
	EndTLSHandshake EndReason = "tls_handshake"
	// EndACMEChallenge: a CA validating a TLS-ALPN-01 challenge; the
	// handshake was all it wanted.
	EndACMEChallenge EndReason = "acme_challenge"
	// EndProtocolMismatch: the client speaks another protocol (HTTP,
	// SMTP, TLS on a cleartext port...).
	EndProtocolMismatch EndReason = "protocol_mismatch"
	// EndProtocolError: a line or command the session cannot go on
	// after (too long, NUL, broken literal).
	EndProtocolError EndReason = "protocol_error"
	// EndBadCommands: Limits.MaxBadCommands reached.
	EndBadCommands EndReason = "bad_commands"
	// EndAuthFailures: Limits.MaxAuthFailures reached.
	EndAuthFailures EndReason = "auth_failures"
	// EndLoginTimeout: the Not Authenticated state outlived
	// Timeouts.Login.
	EndLoginTimeout EndReason = "login_timeout"
	// EndPreAuthIdle: no command for Timeouts.PreAuthIdle.
	EndPreAuthIdle EndReason = "preauth_idle"
	// EndClientReadError, EndClientWriteError: the client's socket
	// failed before the splice.
	EndClientReadError  EndReason = "client_read_error"
	EndClientWriteError EndReason = "client_write_error"
	// EndPanic: a bug; the session said SERVERBUG and ended, the server
	// goes on.
	EndPanic EndReason = "panic"
)

// How a spliced session ends (splice.go, directionEnded).
const (
	// EndClientClosed: the client closed (at any time: the default).
	EndClientClosed EndReason = "client_closed"
	// EndBackendClosed: the backend closed (after its BYE, usually).
	EndBackendClosed EndReason = "backend_closed"
	// EndClientError, EndBackendError: a socket error on either leg.
	EndClientError  EndReason = "client_error"
	EndBackendError EndReason = "backend_error"
	// EndBackendWriteError: the bytes buffered before the splice could
	// not be forwarded to the backend.
	EndBackendWriteError EndReason = "backend_write_error"
	// EndIdle: a leg's deadline passed.
	EndIdle EndReason = "idle"
	// EndClosed: the sockets were closed under the splice (by Close).
	EndClosed EndReason = "closed"
)

// How a session is ended from outside (kick, server.go, drain.go).
const (
	// EndMoved: the user moved to another backend (EvictUser).
	EndMoved EndReason = "moved"
	// EndBackendGone: the backend left the router's table
	// (EvictBackend).
	EndBackendGone EndReason = "backend_gone"
	// EndKicked: an operator's KickUser.
	EndKicked EndReason = "kicked"
	// EndDrained: a paced drain (Spliced.Close).
	EndDrained EndReason = "drained"
	// EndShutdown: Shutdown said goodbye, or its context ended.
	EndShutdown EndReason = "shutdown"
)

// String is the reason as logs and metrics labels show it.
func (r EndReason) String() string { return string(r) }
