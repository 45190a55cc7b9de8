package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
	"go.uber.org/goleak"
)

// localCluster is a cluster started by deploy/local/up.sh.
type localCluster struct {
	dir, bin string
	base     int
	env      []string
}

func (c *localCluster) port(off int) string { return "127.0.0.1:" + strconv.Itoa(c.base+off) }

// The offsets of deploy/local/env.sh.
const (
	offIG1IMAPS = 1993
	offIG1HTTP  = 1080
	offIG2IMAPS = 2993
	offIG2HTTP  = 2080
)

// clusterPorts are every port env.sh derives from the base, TCP and UDP
// (Consul's Serf and DNS use both).
var clusterPorts = []int{300, 301, 302, 500, 502, 600, 143, 144, 1993, 1143, 1080, 2993, 2143, 2080}

// freeBase finds a port base whose derived ports are all free now.
func freeBase(t *testing.T) int {
	t.Helper()
	for range 50 {
		base := 20000 + rand.IntN(400)*100
		if portsFree(base) {
			return base
		}
	}
	t.Fatal("no free port base for deploy/local")
	return 0
}

func portsFree(base int) bool {
	for _, off := range clusterPorts {
		addr := "127.0.0.1:" + strconv.Itoa(base+off)
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		ln.Close()
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		pc.Close()
	}
	return true
}

func (c *localCluster) script(t *testing.T, name string) string {
	t.Helper()
	cmd := exec.Command("bash", filepath.Join(deployDir, "local", name))
	cmd.Env = c.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("deploy/local/%s: %v\n%s\n%s", name, err, out, c.logs())
	}
	t.Logf("deploy/local/%s:\n%s", name, out)
	return string(out)
}

func (c *localCluster) logs() string {
	var b strings.Builder
	for _, f := range []string{"imapgate1.log", "imapgate2.log", "consul.log"} {
		data, _ := os.ReadFile(filepath.Join(c.dir, f))
		if len(data) > 8000 {
			data = data[len(data)-8000:]
		}
		fmt.Fprintf(&b, "--- %s (tail)\n%s\n", f, data)
	}
	return b.String()
}

// ctl runs the built binary's ctl against one instance.
func (c *localCluster) ctl(t *testing.T, httpOff int, args ...string) string {
	t.Helper()
	cmd := exec.Command(c.bin, append([]string{"ctl", "-addr", c.port(httpOff)}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("imapgate ctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestLocalCluster starts deploy/local (Consul, two Dovecots, two
// imapgates), logs alice in through both instances, moves her with
// `imapgate ctl move`, sees both live sessions kicked and the next logins
// land on the new backend, checks the counters, and stops it all.
func TestLocalCluster(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	testenv.Need(t, "dovecot", "consul")
	// /tmp, not t.TempDir: Dovecot's unprivileged processes must traverse
	// the path and its socket paths must stay short.
	dir, err := os.MkdirTemp("", "igl-")
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	c := &localCluster{dir: filepath.Join(dir, "state"), bin: opsBinary(t), base: freeBase(t)}
	c.env = append(os.Environ(),
		"IMAPGATE_LOCAL_DIR="+c.dir,
		"IMAPGATE_LOCAL_PORT_BASE="+strconv.Itoa(c.base),
		"IMAPGATE_BIN="+c.bin,
		"IMAPGATE_CONSUL="+testenv.Bin("consul"),
	)
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			c.script(t, "down.sh")
		}
		os.RemoveAll(dir)
	})
	up := c.script(t, "up.sh")
	for _, want := range []string{"consul", "dovecot1", "dovecot2", "imapgate1", "imapgate2", c.port(offIG1IMAPS)} {
		if !strings.Contains(up, want) {
			t.Errorf("up.sh does not say where %s listens", want)
		}
	}

	const user, pass = "alice@example.org", "alicepass"
	login := func(imaps int) (*opsClient, string) {
		t.Helper()
		cl, err := opsDial(c.port(imaps), true)
		if err != nil {
			t.Fatal(err)
		}
		b, err := cl.backend(user, pass)
		if err != nil {
			cl.Close()
			t.Fatalf("login through %s: %v", c.port(imaps), err)
		}
		t.Cleanup(cl.Close)
		return cl, b
	}
	s1, home := login(offIG1IMAPS)
	s2, home2 := login(offIG2IMAPS)
	if home2 != home {
		t.Fatalf("the two instances disagree: %s and %s", home, home2)
	}
	target := map[string]string{"dovecot1": "dovecot2", "dovecot2": "dovecot1"}[home]

	out := c.ctl(t, offIG1HTTP, "move", user, target)
	want := fmt.Sprintf("moving %s to %s... pinned; 1 session closed; done", user, target)
	if !strings.HasPrefix(out, want) {
		t.Fatalf("ctl move said %q, want %q...", out, want)
	}
	for i, s := range []*opsClient{s1, s2} {
		if err := s.waitClosed(5 * time.Second); err != nil {
			t.Fatalf("session through imapgate%d after the move: %v", i+1, err)
		}
	}
	if _, b := login(offIG2IMAPS); b != target {
		t.Fatalf("login through imapgate2 after the move reached %s, want %s", b, target)
	}
	if _, b := login(offIG1IMAPS); b != target {
		t.Fatalf("login through imapgate1 after the move reached %s, want %s", b, target)
	}
	// Either instance says where the user lives and why.
	if out := c.ctl(t, offIG2HTTP, "where", user); !strings.Contains(out, "next login goes to:  "+target) ||
		!strings.Contains(out, "recorded:            "+target+" (pin)") || !strings.Contains(out, "pinned in consul KV") || !strings.Contains(out, "1 session here") {
		t.Errorf("ctl where on imapgate2:\n%s", out)
	}
	if out := c.ctl(t, offIG2HTTP, "sessions", "-user", user); !strings.Contains(out, target) || !strings.Contains(out, "1 session") {
		t.Errorf("ctl sessions on imapgate2:\n%s", out)
	}
	if out := c.ctl(t, offIG1HTTP, "backends"); !strings.Contains(out, "router: consul") || strings.Count(out, "passing") != 2 {
		t.Errorf("ctl backends:\n%s", out)
	}

	m1 := fetchText(t, "http://"+c.port(offIG1HTTP)+"/metrics")
	m2 := fetchText(t, "http://"+c.port(offIG2HTTP)+"/metrics")
	for _, chk := range []struct {
		metrics, name string
		labels        []string
		min           float64
	}{
		{m1, "imapgate_logins_total", []string{`result="ok"`}, 2},
		{m2, "imapgate_logins_total", []string{`result="ok"`}, 2},
		{m1, "imapgate_consul_evicted_sessions_total", []string{`kind="user"`}, 1},
		{m2, "imapgate_consul_evicted_sessions_total", []string{`kind="user"`}, 1},
		{m1, "imapgate_sessions_ended_total", []string{`reason="moved"`}, 1},
		{m1, "imapgate_admin_actions_total", []string{`action="move"`, `result="ok"`}, 1},
		{m1, "imapgate_consul_placements_total", nil, 1},
		{m1, "imapgate_sessions", []string{`state="spliced"`, `backend="` + target + `"`}, 1},
		{m1, "imapgate_backend_up", []string{`backend="` + target + `"`}, 1},
		{m1, "imapgate_ready", nil, 1},
	} {
		v, ok := metricValue(chk.metrics, chk.name, chk.labels...)
		if !ok || v < chk.min {
			t.Errorf("%s%v = %v (present %v), want at least %v", chk.name, chk.labels, v, ok, chk.min)
		}
	}
	if v, ok := metricValue(m1, "imapgate_consul_view_age_seconds"); !ok || v != 0 {
		t.Errorf("imapgate_consul_view_age_seconds = %v (present %v), want 0", v, ok)
	}

	// A lost registration comes back (as after a zero-downtime upgrade,
	// when the old process deregisters the ID the new one shares).
	consul := "http://" + c.port(500)
	req, _ := http.NewRequest("PUT", consul+"/v1/agent/service/deregister/imapgate1-imaps", nil)
	resp, err := opsHTTP.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("deregistering imapgate1-imaps: %v %v", err, resp)
	}
	resp.Body.Close()
	start := time.Now()
	for {
		resp, err := opsHTTP.Get(consul + "/v1/agent/service/imapgate1-imaps")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Since(start) > 15*time.Second {
			t.Fatalf("imapgate1 did not register again within 15s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("imapgate1 registered again %v after losing its registration", time.Since(start).Round(100*time.Millisecond))

	c.script(t, "status.sh")
	down := c.script(t, "down.sh")
	stopped = true
	for _, name := range []string{"imapgate1", "imapgate2", "dovecot1", "dovecot2", "consul"} {
		if !strings.Contains(down, name) || strings.Contains(down, "STILL RUNNING") {
			t.Errorf("down.sh did not stop %s cleanly", name)
		}
	}
	if _, err := os.Stat(c.dir); !os.IsNotExist(err) {
		t.Errorf("down.sh left %s behind", c.dir)
	}
	for _, off := range []int{offIG1IMAPS, offIG2IMAPS, 143, 500} {
		if cl, err := net.DialTimeout("tcp", c.port(off), time.Second); err == nil {
			cl.Close()
			t.Errorf("%s still accepts after down.sh", c.port(off))
		}
	}
}
