package ctl

import (
	"bytes"
	"net"
	"strings"
	"testing"
)

// TestUsageAndExitStatus: usage errors exit 2 before anything is sent,
// an API that cannot be reached exits 1 naming the command.
func TestUsageAndExitStatus(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close() // nothing listens there now
	for _, tc := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{nil, 2, "Usage: imapgate ctl"},
		{[]string{"bogus"}, 2, `unknown command "bogus"`},
		{[]string{"move", "alice@example.org"}, 2, "want 2 argument(s), got 1"},
		{[]string{"kick"}, 2, "want 1 argument(s), got 0"},
		{[]string{"-nosuchflag", "backends"}, 2, "flag provided but not defined"},
		{[]string{"-h"}, 0, "Usage: imapgate ctl"},
		{[]string{"-addr", closed, "backends"}, 1, "imapgate ctl backends:"},
		{[]string{"kick", "-addr", "http://" + closed, "alice@example.org"}, 1, "imapgate ctl kick:"},
	} {
		var out, errb bytes.Buffer
		if code := Main(tc.args, &out, &errb); code != tc.code || !strings.Contains(errb.String(), tc.stderr) {
			t.Errorf("ctl %q: exit %d, stderr %q; want %d and %q", tc.args, code, errb.String(), tc.code, tc.stderr)
		}
	}
}

func TestHumanFormats(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 5 << 20: "5.0 MiB"} {
		if got := bytesHuman(n); got != want {
			t.Errorf("bytesHuman(%d) = %q, want %q", n, got, want)
		}
	}
	if dash("") != "-" || dash("x") != "x" || plural(1, "a", "b") != "a" || plural(2, "a", "b") != "b" {
		t.Error("dash or plural")
	}
}
