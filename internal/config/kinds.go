package config

import (
	"fmt"
	"strings"

	igtls "github.com/imapgate/imapgate/tls"
)

// The file's enumerated values are parsed once, when the file is decoded
// (each kind is an encoding.TextUnmarshaler), so that a typo is a load
// error naming the line and key, and nothing downstream switches on the
// spelling again. The zero value of each kind is its default, and ""
// in the file means the default too.

// parseKind sets *k to the index of b in names (case-insensitive; "" is
// the zero value).
func parseKind[K ~uint8](k *K, what string, names []string, b []byte) error {
	s := strings.ToLower(strings.TrimSpace(string(b)))
	if s == "" {
		*k = 0
		return nil
	}
	for i, n := range names {
		if s == n {
			*k = K(i)
			return nil
		}
	}
	return fmt.Errorf("unknown %s %q (want %s)", what, s, strings.Join(names, ", "))
}

func kindName(names []string, i int) string {
	if i < 0 || i >= len(names) {
		return fmt.Sprintf("kind(%d)", i)
	}
	return names[i]
}

// RouterKind is routing.router: which router finds users' backends.
type RouterKind uint8

const (
	// RouterStatic is the table in the file ([backends], [routing]); the
	// default.
	RouterStatic RouterKind = iota
	// RouterConsul takes backends and placements from Consul.
	RouterConsul
	// RouterHTTP asks an nginx-style auth_http service.
	RouterHTTP
	// RouterLDAP asks an LDAP directory.
	RouterLDAP
)

var routerNames = []string{"static", "consul", "http", "ldap"}

func (k RouterKind) String() string { return kindName(routerNames, int(k)) }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *RouterKind) UnmarshalText(b []byte) error { return parseKind(k, "router", routerNames, b) }

// External reports whether the router's table comes from outside the
// file (Consul or a directory), so that [backends] and [routing] are not
// its to reload.
func (k RouterKind) External() bool { return k != RouterStatic }

// Directory reports whether the router asks a directory (http or ldap).
func (k RouterKind) Directory() bool { return k == RouterHTTP || k == RouterLDAP }

// LogFormat is log.format.
type LogFormat uint8

const (
	// LogAuto is console on a terminal, JSON otherwise; the default.
	LogAuto LogFormat = iota
	// LogJSON is one JSON object a line.
	LogJSON
	// LogConsole is zap's human-readable console encoding.
	LogConsole
)

var logFormatNames = []string{"auto", "json", "console"}

func (f LogFormat) String() string { return kindName(logFormatNames, int(f)) }

// UnmarshalText implements encoding.TextUnmarshaler.
func (f *LogFormat) UnmarshalText(b []byte) error {
	return parseKind(f, "log format", logFormatNames, b)
}

// ACMEStorage is tls.acme.storage: where ACME data lives.
type ACMEStorage uint8

const (
	// StorageFile is a local directory (storage_dir); the default.
	StorageFile ACMEStorage = iota
	// StorageConsul is Consul KV, shared by a fleet.
	StorageConsul
)

var storageNames = []string{"file", "consul"}

func (s ACMEStorage) String() string { return kindName(storageNames, int(s)) }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *ACMEStorage) UnmarshalText(b []byte) error { return parseKind(s, "storage", storageNames, b) }

// kind is the tls package's spelling of s.
func (s ACMEStorage) kind() igtls.StorageKind {
	if s == StorageConsul {
		return igtls.StorageConsul
	}
	return igtls.StorageFile
}

// TicketStore is tls.session_tickets.store: where the fleet's session
// ticket keys live.
type TicketStore uint8

const (
	// TicketsAuto is Consul KV when the Consul router or ACME storage is
	// configured, else the file if one is set, else off; the default.
	TicketsAuto TicketStore = iota
	// TicketsConsul is one Consul KV entry.
	TicketsConsul
	// TicketsFile is a JSON file every instance can lock.
	TicketsFile
	// TicketsOff leaves each instance its own keys.
	TicketsOff
)

var ticketStoreNames = []string{"auto", "consul", "file", "off"}

func (s TicketStore) String() string { return kindName(ticketStoreNames, int(s)) }

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *TicketStore) UnmarshalText(b []byte) error {
	return parseKind(s, "store", ticketStoreNames, b)
}
