package routing

// Stand-in for testenv.StartConsul until internal/testenv has it: the same
// shape (HTTPAddr, Stop, Start on the same ports), a real `consul agent
// -dev` on loopback. Delete this file once testenv.StartConsul lands.

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/testenv"
)

type testConsul struct {
	HTTPAddr string
	args     []string
	log      string
	cmd      *exec.Cmd
	done     chan struct{}
}

func startConsul(t testing.TB) *testConsul {
	t.Helper()
	testenv.Need(t, "consul")
	ports := make([]int, 5)
	for i := range ports {
		ports[i] = testenv.FreePort(t)
	}
	dir := t.TempDir()
	c := &testConsul{
		HTTPAddr: "127.0.0.1:" + strconv.Itoa(ports[0]),
		log:      filepath.Join(dir, "consul.log"),
		args: []string{"agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-node=test", "-log-level=warn",
			"-http-port=" + strconv.Itoa(ports[0]), "-dns-port=-1", "-grpc-port=" + strconv.Itoa(ports[1]),
			"-serf-lan-port=" + strconv.Itoa(ports[2]), "-serf-wan-port=" + strconv.Itoa(ports[3]),
			"-server-port=" + strconv.Itoa(ports[4])},
	}
	c.Start(t)
	t.Cleanup(func() { c.Stop(t) })
	return c
}

func (c *testConsul) Start(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(c.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c.cmd = exec.Command(testenv.Bin("consul"), c.args...)
	c.cmd.Stdout, c.cmd.Stderr = f, f
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(c.cmd, c.done)
	client := &http.Client{Timeout: time.Second}
	defer client.CloseIdleConnections()
	for end := time.Now().Add(30 * time.Second); ; {
		resp, err := client.Get("http://" + c.HTTPAddr + "/v1/status/leader")
		if err == nil {
			var buf [64]byte
			n, _ := resp.Body.Read(buf[:])
			resp.Body.Close()
			if resp.StatusCode == 200 && n > 2 { // `""` until there is a leader
				return
			}
		}
		if time.Now().After(end) {
			b, _ := os.ReadFile(c.log)
			t.Fatalf("consul not ready: %v\n%s", err, b)
		}
		select {
		case <-c.done:
			b, _ := os.ReadFile(c.log)
			t.Fatalf("consul exited:\n%s", b)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (c *testConsul) Stop(t testing.TB) {
	t.Helper()
	if c.cmd == nil {
		return
	}
	syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	<-c.done
	c.cmd = nil
}
