package config

import "testing"

func TestConsulSnapshotPath(t *testing.T) {
	for _, tc := range []struct {
		file, stateDir, want string
	}{
		{"", "", ""},
		{"", "/var/lib/imapgate", "/var/lib/imapgate/consul-snapshot.json"},
		{"", "/var/lib/imapgate:/var/lib/other", "/var/lib/imapgate/consul-snapshot.json"},
		{"/srv/snap.json", "/var/lib/imapgate", "/srv/snap.json"},
		{"off", "/var/lib/imapgate", ""},
		{"none", "", ""},
	} {
		t.Setenv("STATE_DIRECTORY", tc.stateDir)
		c := Consul{SnapshotFile: tc.file}
		if got := c.SnapshotPath(); got != tc.want {
			t.Errorf("snapshot_file %q, STATE_DIRECTORY %q: %q, want %q", tc.file, tc.stateDir, got, tc.want)
		}
	}
	c, err := Parse("[consul]\nsnapshot_file = \"/x/s.json\"\nsnapshot_max_age = \"2h\"\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Consul.SnapshotPath() != "/x/s.json" || c.Consul.SnapshotMaxAge.D().Hours() != 2 {
		t.Errorf("parsed %+v", c.Consul)
	}
}
