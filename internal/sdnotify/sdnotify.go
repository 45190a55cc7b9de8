// Package sdnotify speaks systemd's notification protocol (sd_notify(3))
// so that imapgate's unit can be Type=notify (and notify-reload), with
// the watchdog when WatchdogSec= is set.
//
// Typical use:
//
//	n := sdnotify.New(os.Getenv)
//	n.Ready("serving")
//	go n.RunWatchdog(ctx)
//	n.Stopping("draining")
package sdnotify

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Notifier speaks systemd's notification protocol: one datagram of newline-separated
// KEY=VALUE lines to the unix socket named by $NOTIFY_SOCKET. It is a
// dozen lines, not worth a dependency. Without $NOTIFY_SOCKET (not under
// systemd, or Type=simple) every call does nothing.
type Notifier struct {
	addr     *net.UnixAddr // nil: not under systemd
	watchdog time.Duration // half of $WATCHDOG_USEC, 0 if unset
}

// New reads the environment once; the variables are left in place for
// nothing else in this process uses them. A nil *Notifier, like one
// without $NOTIFY_SOCKET, does nothing.
func New(getenv func(string) string) *Notifier {
	n := &Notifier{}
	path := getenv("NOTIFY_SOCKET")
	switch {
	case path == "":
		return n
	case strings.HasPrefix(path, "@"):
		// An abstract socket: Go spells the leading NUL as '@' too.
	case !strings.HasPrefix(path, "/"):
		return n // vsock and friends: not for us
	}
	n.addr = &net.UnixAddr{Name: path, Net: "unixgram"}
	if us, err := strconv.ParseInt(getenv("WATCHDOG_USEC"), 10, 64); err == nil && us > 0 {
		pid := getenv("WATCHDOG_PID")
		if pid == "" || pid == strconv.Itoa(os.Getpid()) {
			n.watchdog = time.Duration(us) * time.Microsecond / 2
		}
	}
	return n
}

// send delivers one notification, e.g. "READY=1\nSTATUS=serving".
func (n *Notifier) send(state string) error {
	if n == nil || n.addr == nil {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// Ready says start-up (or a reload) is over.
func (n *Notifier) Ready(status string) error {
	return n.send("READY=1\nSTATUS=" + status)
}

// Reloading starts a reload; Ready ends it. MONOTONIC_USEC lets
// Type=notify-reload (systemd 253+) match the two; older systemd ignores
// it.
func (n *Notifier) Reloading() error {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	us := ts.Sec*1e6 + ts.Nsec/1e3
	return n.send("RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(us, 10))
}

// Stopping says the drain has begun.
func (n *Notifier) Stopping(status string) error {
	return n.send("STOPPING=1\nSTATUS=" + status)
}

// RunWatchdog pings systemd's watchdog until ctx ends, when the unit has
// WatchdogSec= set. A stuck process stops pinging and systemd restarts it.
func (n *Notifier) RunWatchdog(ctx context.Context) {
	if n == nil || n.addr == nil || n.watchdog <= 0 {
		return
	}
	t := time.NewTicker(n.watchdog)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_ = n.send("WATCHDOG=1")
		}
	}
}
