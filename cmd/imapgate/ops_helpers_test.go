package main

// Helpers of the operations tests (admin API, drain, reload, deploy/local):
// an in-process IMAP backend, a raw IMAP client, the built binary, and a
// running binary with its log. Named ops* so they do not collide with the
// end-to-end test's helpers.

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/memimap"
)

// opsBackend starts an in-memory IMAP server with users (name →
// password); each user's INBOX holds one message whose subject names the
// backend. It stops with the test.
func opsBackend(t testing.TB, name string, users map[string]string) string {
	t.Helper()
	srv, err := memimap.Start(name, users)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv.Addr
}

// opsClient is a raw IMAP client: enough to log in, ask which backend it
// reached, and notice being closed.
type opsClient struct {
	c net.Conn
	r *bufio.Reader
	n int
}

// opsDial connects (over TLS without verification if useTLS) and reads
// the greeting.
func opsDial(addr string, useTLS bool) (*opsClient, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if useTLS {
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, ServerName: "localhost", NextProtos: []string{"imap"}})
		tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		c = tc
	}
	cl := &opsClient{c: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := cl.r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "* OK") {
		c.Close()
		return nil, fmt.Errorf("greeting %q: %v", line, err)
	}
	return cl, nil
}

// cmd sends one command and returns every line up to its tagged reply,
// and an error unless that reply is OK.
func (c *opsClient) cmd(format string, args ...any) ([]string, error) {
	c.n++
	tag := fmt.Sprintf("t%d", c.n)
	c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c.c, tag+" "+format+"\r\n", args...); err != nil {
		return nil, err
	}
	var lines []string
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return lines, err
		}
		lines = append(lines, line)
		if strings.HasPrefix(line, tag+" ") {
			if !strings.HasPrefix(line, tag+" OK") {
				return lines, fmt.Errorf("%s", strings.TrimSpace(line))
			}
			return lines, nil
		}
	}
}

func (c *opsClient) login(user, pass string) error {
	_, err := c.cmd("LOGIN %q %q", user, pass)
	return err
}

// backend logs in and reads the subject of INBOX's first message: which
// backend the session reached.
func (c *opsClient) backend(user, pass string) (string, error) {
	if err := c.login(user, pass); err != nil {
		return "", err
	}
	if _, err := c.cmd("SELECT INBOX"); err != nil {
		return "", err
	}
	lines, err := c.cmd("FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
	if err != nil {
		return "", err
	}
	for _, l := range lines {
		// internal/memimap's marker, or deploy/local's Dovecots'.
		for _, prefix := range []string{"Subject: Hello from backend ", "Subject: You are on "} {
			if s, ok := strings.CutPrefix(strings.TrimSpace(l), prefix); ok {
				return s, nil
			}
		}
	}
	return "", fmt.Errorf("no marker in %q", lines)
}

// waitClosed waits for the server to close the session (a BYE, then EOF).
func (c *opsClient) waitClosed(d time.Duration) error {
	c.c.SetReadDeadline(time.Now().Add(d))
	for {
		if _, err := c.r.ReadString('\n'); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return fmt.Errorf("still open after %v", d)
			}
			return nil
		}
	}
}

func (c *opsClient) Close() { c.c.Close() }

// opsBinary builds the imapgate binary into the test's directory, without
// the race detector (the load tests measure it). The build cache makes
// every build after the first a link.
func opsBinary(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "imapgate")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// opsProc is a running imapgate binary and its JSON log.
type opsProc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []string
	seen chan struct{}
	done chan struct{}
	err  error
}

func startOps(t testing.TB, bin string, args ...string) *opsProc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=")
	return startOpsCmd(t, cmd)
}

// startOpsCmd starts cmd (an imapgate binary) and collects its log.
func startOpsCmd(t testing.TB, cmd *exec.Cmd) *opsProc {
	t.Helper()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &opsProc{cmd: cmd, seen: make(chan struct{}, 1), done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.logs = append(p.logs, sc.Text())
			p.mu.Unlock()
			select {
			case p.seen <- struct{}{}:
			default:
			}
		}
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
	})
	return p
}

// waitLog waits for a log line containing every one of subs.
func (p *opsProc) waitLog(t testing.TB, timeout time.Duration, subs ...string) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		p.mu.Lock()
		for _, l := range p.logs {
			if containsAll(l, subs) {
				p.mu.Unlock()
				return l
			}
		}
		p.mu.Unlock()
		select {
		case <-p.seen:
		case <-p.done:
			// One last look: the line may have come with the exit.
			p.mu.Lock()
			for _, l := range p.logs {
				if containsAll(l, subs) {
					p.mu.Unlock()
					return l
				}
			}
			p.mu.Unlock()
			t.Fatalf("imapgate exited (%v) before logging %q; log:\n%s", p.err, subs, p.dump())
		case <-deadline:
			t.Fatalf("no log line with %q within %v; log:\n%s", subs, timeout, p.dump())
		}
	}
}

func containsAll(s string, subs []string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

func (p *opsProc) dump() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.logs, "\n")
}

func (p *opsProc) signal(sig syscall.Signal) { p.cmd.Process.Signal(sig) }

// wait waits for the process to exit and returns its exit code.
func (p *opsProc) wait(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("imapgate still running after %v; log:\n%s", timeout, p.dump())
	}
	if p.err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	t.Fatalf("imapgate: %v", p.err)
	return -1
}

// getJSON fetches url and decodes its JSON body into v.
func getJSON(t testing.TB, url, token string, v any) int {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := opsHTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("GET %s: %v: %s", url, err, b)
		}
	}
	return resp.StatusCode
}

// opsHTTP keeps no idle connections, so no transport goroutine outlives a
// test (goleak).
var opsHTTP = &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// metricValue sums the samples of a metric whose label set contains every
// one of labels (`result="ok"`) in a Prometheus text exposition.
func metricValue(exposition, name string, labels ...string) (float64, bool) {
	var sum float64
	found := false
	for _, line := range strings.Split(exposition, "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != '{' && rest[0] != ' ') {
			continue // a longer name with this prefix
		}
		if !containsAll(rest, labels) {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(rest[strings.LastIndexByte(rest, ' ')+1:], &v); err == nil {
			sum += v
			found = true
		}
	}
	return sum, found
}

func fetchText(t testing.TB, url string) string {
	t.Helper()
	resp, err := opsHTTP.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// waitHTTP waits until url answers 200.
func waitHTTP(t testing.TB, url string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := opsHTTP.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not 200 within %v (last error %v)", url, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
