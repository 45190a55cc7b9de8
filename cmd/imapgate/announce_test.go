package main

import (
	"strings"
	"testing"
)

// ctl announce needs a router with a change feed: the static router says
// so, with the API's error and exit status 1.
func TestCtlAnnounceWithoutFeed(t *testing.T) {
	ta := startTestApp(t)
	code, _, stderr := ta.ctl("announce", "alice@example.org")
	if code != 1 || !strings.Contains(stderr, "no change feed") {
		t.Errorf("ctl announce with the static router: exit %d %q", code, stderr)
	}
	if code, _, stderr := ta.ctl("announce"); code != 2 {
		t.Errorf("ctl announce without a user: exit %d %q", code, stderr)
	}
}
