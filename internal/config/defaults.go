package config

import "time"

// Defaults the file documents and the binary applies.
const (
	// DefaultHTTPAddr is http.addr when the file leaves it empty.
	DefaultHTTPAddr = "127.0.0.1:8080"
	// DefaultGrace is shutdown.grace when zero.
	DefaultGrace = 30 * time.Second
	// DefaultDrainWindow is shutdown.drain_window when zero.
	DefaultDrainWindow = 10 * time.Second
)

// ListenAddr is the address of the HTTP listener, "" if off.
func (h HTTP) ListenAddr() string {
	switch h.Addr {
	case "off":
		return ""
	case "":
		return DefaultHTTPAddr
	}
	return h.Addr
}

// Times returns the drain window and the grace after it, defaults
// applied.
func (s Shutdown) Times() (window, grace time.Duration) {
	window, grace = s.DrainWindow.D(), s.Grace.D()
	if window <= 0 {
		window = DefaultDrainWindow
	}
	if grace <= 0 {
		grace = DefaultGrace
	}
	return window, grace
}
