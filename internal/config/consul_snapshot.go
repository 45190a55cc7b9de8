package config

import (
	"os"
	"path/filepath"
	"strings"
)

// SnapshotFileName is the Consul router's snapshot under the state
// directory.
const SnapshotFileName = "consul-snapshot.json"

// SnapshotPath is where the Consul router keeps its snapshot
// (consul.snapshot_file): the configured path; if empty,
// $STATE_DIRECTORY/consul-snapshot.json when systemd gives a state
// directory (the Debian package: /var/lib/imapgate), else none; "off"
// means none. None ("") means a start while Consul is unreachable fails.
func (c *Consul) SnapshotPath() string {
	switch p := strings.TrimSpace(c.SnapshotFile); p {
	case "off", "none":
		return ""
	case "":
		if d := os.Getenv("STATE_DIRECTORY"); d != "" {
			// systemd may list several, colon-separated; the first is ours.
			return filepath.Join(strings.Split(d, ":")[0], SnapshotFileName)
		}
		return ""
	default:
		return p
	}
}
