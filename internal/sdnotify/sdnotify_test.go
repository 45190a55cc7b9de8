package sdnotify

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestNotifier(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	env := map[string]string{"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
	n := New(func(k string) string { return env[k] })
	if n.watchdog != 100*time.Millisecond {
		t.Errorf("watchdog interval %v, want half of WATCHDOG_USEC", n.watchdog)
	}
	read := func() string {
		t.Helper()
		buf := make([]byte, 512)
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		k, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:k])
	}
	if err := n.Ready("serving"); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "READY=1\nSTATUS=serving" {
		t.Errorf("ready sent %q", got)
	}
	n.Reloading()
	if got := read(); !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") {
		t.Errorf("reloading sent %q", got)
	}
	n.Stopping("draining")
	if got := read(); got != "STOPPING=1\nSTATUS=draining" {
		t.Errorf("stopping sent %q", got)
	}

	// Not under systemd: nothing to do, no error.
	for _, e := range []map[string]string{{}, {"NOTIFY_SOCKET": "vsock:2:1234"}} {
		n := New(func(k string) string { return e[k] })
		if err := n.Ready("x"); err != nil || n.addr != nil {
			t.Errorf("env %v: %v", e, err)
		}
	}
	// The watchdog is for another process.
	env["WATCHDOG_PID"] = "1"
	if n := New(func(k string) string { return env[k] }); n.watchdog != 0 {
		t.Errorf("watchdog armed for pid 1")
	}
}
