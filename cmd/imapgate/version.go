package main

import (
	"fmt"
	"io"
	"net/http"
	"runtime"
	"runtime/debug"
	"time"
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

// buildVersion says which imapgate this is.
type buildVersion struct {
	Version   string `json:"version"`
	Commit    string `json:"commit"`
	GoVersion string `json:"go_version"`
	// Modified is true when the binary was built from a checkout with
	// uncommitted changes (from the VCS stamp; false when unknown).
	Modified bool `json:"modified,omitempty"`
}

// currentVersion combines the link-time values with the build info the Go
// toolchain embeds.
func currentVersion() buildVersion {
	v := buildVersion{Version: version, Commit: commit, GoVersion: runtime.Version()}
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

// String is the one line `imapgate version` prints.
func (v buildVersion) String() string {
	c := v.Commit
	if v.Modified {
		c += "-dirty"
	}
	return fmt.Sprintf("imapgate %s (commit %s, %s)", v.Version, c, v.GoVersion)
}

func printVersion(stdout io.Writer) int {
	fmt.Fprintln(stdout, currentVersion())
	return 0
}

// versionReply is GET /admin/version.
type versionReply struct {
	buildVersion
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`
}

func (a *app) handleVersion(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, versionReply{buildVersion: currentVersion(), Started: started, UptimeSeconds: time.Since(started).Seconds()})
}
