package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
)

// Set at link time by packaging and release builds:
//
//	go build -ldflags "-X main.version=1.2.0 -X main.commit=abc1234" ./cmd/imapgate
//
// When empty, the values the Go toolchain stamped into the binary are used
// (the module version for `go install ...@v1.2.0`, the VCS revision for a
// build inside a git checkout).
var (
	version string
	commit  string
)

// started is when this process started, for uptime on the status page
// and in the admin API.
var started = time.Now()

// currentVersion combines the link-time values with the build info the Go
// toolchain embeds.
func currentVersion() adminapi.Version {
	v := adminapi.Version{Version: version, Commit: commit, GoVersion: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v.Version == "" && bi.Main.Version != "" {
			v.Version = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if v.Commit == "" {
					v.Commit = s.Value
				}
			case "vcs.modified":
				v.Modified = s.Value == "true"
			}
		}
	}
	if v.Version == "" {
		v.Version = "(devel)"
	}
	if v.Commit == "" {
		v.Commit = "unknown"
	}
	return v
}

func printVersion(stdout io.Writer) int {
	fmt.Fprintln(stdout, currentVersion())
	return 0
}
