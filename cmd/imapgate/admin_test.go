package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/ctl"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
)

const testToken = "s3cret-token"

var testUsers = map[string]string{
	"alice@example.org": "alicepass",
	"bob@example.org":   "bobpass",
	"carol@example.net": "carolpass",
	"dave@example.net":  "davepass",
	"erin@example.net":  "erinpass",
	"frank@example.org": "frankpass",
}

// testApp is an in-process imapgate with the static router over two
// in-memory backends, b1 and b2, a cleartext listener that allows login
// from loopback, and the admin API with testToken.
type testApp struct {
	*app
	path  string // the config file, for reloads
	imap  string // listener address
	admin string // http://host:port
}

func testConfig(b1, b2, extra string) string {
	return fmt.Sprintf(`
[log]
level = "info"

[[listen]]
addr = "127.0.0.1:0"
mode = "starttls"
name = "imap"
insecure_auth = ["127.0.0.0/8"]

[backends.b1]
addr = %q

[backends.b2]
addr = %q

[routing]
default = ["b1", "b2"]

[limits]
auth_failure_delay = "-1s"
max_connections_per_ip = -1

[http]
addr = "127.0.0.1:0"
admin_token = %q

[shutdown]
drain_window = "500ms"
grace = "2s"
%s`, b1, b2, testToken, extra)
}

func startTestApp(t *testing.T) *testApp {
	t.Helper()
	return startTestAppWith(t, nil)
}

// startTestAppWith is startTestApp with edit applied to the config text.
func startTestAppWith(t *testing.T, edit func(string) string) *testApp {
	t.Helper()
	ta, _, _ := startTestAppText(t, func(b1, b2 string) string {
		text := testConfig(b1, b2, "")
		if edit != nil {
			text = edit(text)
		}
		return text
	})
	return ta
}

// startTestAppText starts an app on the config text(b1, b2) over two
// in-memory backends, which it returns with the app.
func startTestAppText(t *testing.T, text func(b1, b2 string) string) (*testApp, string, string) {
	t.Helper()
	// Registered first, so it runs after every other cleanup.
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	b1 := opsBackend(t, "b1", testUsers)
	b2 := opsBackend(t, "b2", testUsers)
	path := filepath.Join(t.TempDir(), "imapgate.toml")
	if err := os.WriteFile(path, []byte(text(b1, b2)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		t.Fatal(err)
	}
	lvl := zap.NewAtomicLevelAt(zapcore.InfoLevel)
	log := zaptest.NewLogger(t, zaptest.Level(zapcore.WarnLevel))
	ctx := context.Background()
	a, err := newApp(ctx, cfg, log, &lvl)
	if err != nil {
		t.Fatal(err)
	}
	a.flags = &flags{config: path}
	t.Cleanup(a.close)
	lns, err := bindListeners(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.start(ctx, 0, lns); err != nil {
		t.Fatal(err)
	}
	return &testApp{app: a, path: path, imap: a.lnAddrs[0].String(), admin: "http://" + a.httpAddr.String()}, b1, b2
}

// home logs user in and returns the client and the backend it reached.
func (ta *testApp) home(t *testing.T, user string) (*opsClient, string) {
	t.Helper()
	c, err := opsDial(ta.imap, false)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.backend(user, testUsers[user])
	if err != nil {
		c.Close()
		t.Fatalf("login %s: %v", user, err)
	}
	t.Cleanup(c.Close)
	return c, b
}

// ctl runs `imapgate ctl` against the app and returns its exit code and
// output.
func (ta *testApp) ctl(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := ctl.Main(append([]string{"-addr", ta.admin, "-token", testToken}, args...), &out, &errb)
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	return code, out.String(), errb.String()
}

func (ta *testApp) request(t *testing.T, method, path, token string, hdr map[string]string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, ta.admin+path, strings.NewReader("{}"))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := opsHTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

func TestAdminToken(t *testing.T) {
	ta := startTestApp(t)
	for _, tc := range []struct {
		name, method, path, token string
		hdr                       map[string]string
		want                      int
	}{
		{"no token", "GET", "/admin/sessions", "", nil, 401},
		{"wrong token", "GET", "/admin/sessions", "nope", nil, 401},
		{"prefix of the token", "GET", "/admin/sessions", testToken[:5], nil, 401},
		{"right token", "GET", "/admin/sessions", testToken, nil, 200},
		{"kick without token", "POST", "/admin/users/alice@example.org/kick", "", nil, 401},
		{"cross-site", "GET", "/admin/sessions", testToken, map[string]string{"Origin": "https://evil.example"}, 403},
		{"unknown endpoint", "GET", "/admin/nope", testToken, nil, 404},
		{"healthz is open", "GET", "/healthz", "", nil, 200},
		{"readyz is open", "GET", "/readyz", "", nil, 200},
		{"metrics are open", "GET", "/metrics", "", nil, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, body := ta.request(t, tc.method, tc.path, tc.token, tc.hdr); got != tc.want {
				t.Errorf("%s %s: %d, want %d: %s", tc.method, tc.path, got, tc.want, body)
			}
		})
	}
	if code, _, stderr := ta.ctl("-token", "wrong", "backends"); code != 1 || !strings.Contains(stderr, "HTTP 401") {
		t.Errorf("ctl with a wrong token: exit %d, %q", code, stderr)
	}
}

func TestAdminSessionsAndKick(t *testing.T) {
	ta := startTestApp(t)
	alice, aliceHome := ta.home(t, "alice@example.org")
	_, bobHome := ta.home(t, "bob@example.org")

	var all adminapi.SessionsReply
	getJSON(t, ta.admin+"/admin/sessions", testToken, &all)
	if all.Count != 2 {
		t.Fatalf("%d sessions, want 2: %+v", all.Count, all)
	}
	var r adminapi.SessionsReply
	getJSON(t, ta.admin+"/admin/sessions?user=Alice@Example.org", testToken, &r)
	if r.Count != 1 || r.Sessions[0].User != "alice@example.org" || r.Sessions[0].Backend != aliceHome || r.Sessions[0].State != "spliced" {
		t.Fatalf("filter by user: %+v", r)
	}
	getJSON(t, ta.admin+"/admin/sessions?backend="+bobHome, testToken, &r)
	if !slices.ContainsFunc(r.Sessions, func(s adminapi.Session) bool { return s.User == "bob@example.org" }) ||
		slices.ContainsFunc(r.Sessions, func(s adminapi.Session) bool { return s.Backend != bobHome }) {
		t.Fatalf("filter by backend %s: %+v", bobHome, r)
	}
	getJSON(t, ta.admin+"/admin/sessions?user=nobody", testToken, &r)
	if r.Count != 0 || r.Sessions == nil {
		t.Fatalf("no match must be an empty list: %+v", r)
	}

	code, out, stderr := ta.ctl("sessions", "-user", "bob@example.org")
	if code != 0 || !strings.Contains(out, "bob@example.org") || strings.Contains(out, "alice") || !strings.Contains(out, "1 session\n") {
		t.Fatalf("ctl sessions -user bob: exit %d\n%s%s", code, out, stderr)
	}

	code, out, stderr = ta.ctl("-json", "kick", "alice@example.org")
	var k adminapi.KickReply
	if code != 0 || json.Unmarshal([]byte(out), &k) != nil || k.Closed != 1 || k.User != "alice@example.org" {
		t.Fatalf("ctl -json kick: exit %d %q %q", code, out, stderr)
	}
	if err := alice.waitClosed(2 * time.Second); err != nil {
		t.Fatalf("kicked session: %v", err)
	}
	waitNoSessions(t, ta, "alice@example.org") // the session may be listed until its goroutine ends
	code, out, _ = ta.ctl("kick", "alice@example.org")
	if code != 0 || out != "kicked alice@example.org: 0 sessions closed\n" {
		t.Fatalf("second kick: exit %d %q", code, out)
	}
}

// A static drain evacuates: the drained backend's users go to the next
// backend of their pool and their sessions there are closed; an undrain
// brings them back the same way (defect 3: the sessions moved by the
// drain stayed on the fallback after the undrain, so the user was split).
// Route never depends on the sessions an instance holds, so instances
// with the same drains agree.
func TestAdminStaticDrain(t *testing.T) {
	ta := startTestApp(t)
	homes := map[string]string{}
	for u := range testUsers {
		c, b := ta.home(t, u)
		homes[u] = b
		c.cmd("LOGOUT")
		c.Close()
	}
	var onB1 []string
	for u, b := range homes {
		if b == "b1" {
			onB1 = append(onB1, u)
		}
	}
	if len(onB1) < 2 {
		t.Skipf("hashing put fewer than two of %d users on b1: %v", len(homes), homes)
	}
	slices.Sort(onB1)
	stay, moved := onB1[0], onB1[1]
	waitNoSessions(t, ta, moved)
	live, _ := ta.home(t, stay)

	code, out, stderr := ta.ctl("drain", "b1")
	if code != 0 || !strings.HasPrefix(out, "draining b1... ") || !strings.HasSuffix(strings.TrimSpace(out), ")") || !strings.Contains(out, "done") {
		t.Fatalf("ctl drain: exit %d %q %q", code, out, stderr)
	}
	if err := live.waitClosed(3 * time.Second); err != nil {
		t.Errorf("%s's session on drained b1: %v", stay, err)
	}
	if _, b := ta.home(t, stay); b != "b2" {
		t.Errorf("%s went to %s while b1 drains", stay, b)
	}
	movedC, b := ta.home(t, moved)
	if b != "b2" {
		t.Errorf("%s went to %s while b1 drains", moved, b)
	}
	var br adminapi.BackendsReply
	getJSON(t, ta.admin+"/admin/backends", testToken, &br)
	if br.Router != "static" || len(br.Backends) != 2 || !br.Backends[0].Drain || br.Backends[1].Drain || br.Backends[0].Sessions != 0 {
		t.Fatalf("backends while b1 drains: %+v", br)
	}
	if code, _, stderr := ta.ctl("drain", "b2"); code != 1 || !strings.Contains(stderr, "last undrained backend") {
		t.Errorf("draining the last backend of the pool: exit %d %q", code, stderr)
	}
	if code, _, stderr := ta.ctl("drain", "b9"); code != 1 || !strings.Contains(stderr, "unknown backend") || !strings.Contains(stderr, "404") {
		t.Errorf("draining an unknown backend: exit %d %q", code, stderr)
	}
	if code, out, _ := ta.ctl("undrain", "b1"); code != 0 || !strings.Contains(out, "done") {
		t.Fatalf("ctl undrain: exit %d %q", code, out)
	}
	// The session the drain sent to b2 is closed: new logins go to b1.
	if err := movedC.waitClosed(3 * time.Second); err != nil {
		t.Errorf("%s's session on b2 after b1 was undrained: %v", moved, err)
	}
	waitNoSessions(t, ta, moved)
	if _, b := ta.home(t, moved); b != "b1" {
		t.Errorf("%s went to %s after undrain, want b1", moved, b)
	}
	metrics := fetchText(t, ta.admin+"/metrics")
	if v, _ := metricValue(metrics, "imapgate_admin_actions_total", `action="drain"`, `result="ok"`); v != 1 {
		t.Errorf("imapgate_admin_actions_total{drain,ok} = %v, want 1", v)
	}
}

func waitNoSessions(t *testing.T, ta *testApp, user string) {
	t.Helper()
	if err := routing.WaitFor(t.Context(), 50*time.Millisecond, func() bool { return len(ta.srv.Sessions(user, "")) == 0 }); err != nil {
		t.Fatal(err)
	}
}

// The static router moves a user on this instance (until restart), and
// ctl where says where a user lives and why.
func TestAdminStaticMoveAndWhere(t *testing.T) {
	ta := startTestApp(t)
	const user = "alice@example.org"
	live, home := ta.home(t, user)
	target := map[string]string{"b1": "b2", "b2": "b1"}[home]
	code, out, stderr := ta.ctl("where", user)
	if code != 0 || !strings.Contains(out, "next login goes to:  "+home) || !strings.Contains(out, "hashed over the default pool") || !strings.Contains(out, "1 session here") {
		t.Fatalf("ctl where: exit %d %q %q", code, out, stderr)
	}
	code, out, stderr = ta.ctl("move", user, target)
	if code != 0 || !strings.HasPrefix(out, fmt.Sprintf("moving %s to %s... pinned; 1 session closed; done", user, target)) {
		t.Fatalf("ctl move with the static router: exit %d %q %q", code, out, stderr)
	}
	if err := live.waitClosed(3 * time.Second); err != nil {
		t.Fatal(err)
	}
	if _, b := ta.home(t, user); b != target {
		t.Errorf("after the move %s went to %s, want %s", user, b, target)
	}
	code, out, _ = ta.ctl("where", user)
	if code != 0 || !strings.Contains(out, "recorded:            "+target+" (pin)") || !strings.Contains(out, "moved to "+target) {
		t.Errorf("ctl where after the move: %q", out)
	}
	if code, _, stderr := ta.ctl("move", user); code != 2 {
		t.Errorf("ctl move with one argument: exit %d %q", code, stderr)
	}
	if code, _, stderr := ta.ctl("move", user, "b9"); code != 1 || !strings.Contains(stderr, "unknown backend") {
		t.Errorf("ctl move to an unknown backend: exit %d %q", code, stderr)
	}
}

func TestReloadApplyAndRefuse(t *testing.T) {
	ta := startTestApp(t)
	users := slices.Sorted(func(yield func(string) bool) {
		for u := range testUsers {
			if !yield(u) {
				return
			}
		}
	})
	user := users[0]
	live, home := ta.home(t, user)
	other := map[string]string{"b1": "b2", "b2": "b1"}[home]
	b1, b2 := ta.cfg.Load().Backends["b1"].Addr, ta.cfg.Load().Backends["b2"].Addr

	// A valid file: a pin moves the user (their live session is closed),
	// the log level and a proxy limit change live.
	good := strings.Replace(testConfig(b1, b2, ""), `level = "info"`, `level = "debug"`, 1) +
		fmt.Sprintf("\n[routing.users]\n%q = %q\n", user, other)
	good = strings.Replace(good, "[limits]\n", "[limits]\nmax_bad_commands = 9\n", 1)
	write(t, ta.path, good)
	rep := ta.Reload(t.Context())
	if rep.Result != "applied" || rep.Evicted != 1 || rep.Certificates != "reloaded" {
		t.Fatalf("reload: %+v", rep)
	}
	wantApplied := []string{"limits.max_bad_commands", "log.level", fmt.Sprintf("routing.users.%q", user)}
	if !slices.Equal(rep.Applied, wantApplied) || len(rep.Restart) != 0 {
		t.Fatalf("reload applied %q (want %q), restart %q", rep.Applied, wantApplied, rep.Restart)
	}
	if ta.level.Level() != zapcore.DebugLevel {
		t.Errorf("log level %v after reload, want debug", ta.level.Level())
	}
	if ta.cfg.Load().Limits.MaxBadCommands != 9 {
		t.Errorf("limits.max_bad_commands = %d in the configuration in force, want 9", ta.cfg.Load().Limits.MaxBadCommands)
	}
	// The proxy took it: a client now gets 8 BADs before the BYE.
	c, err := net.Dial("tcp", ta.imap)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tc := c // the test app's listener is cleartext (STARTTLS)
	br := bufio.NewReader(tc)
	br.ReadString('\n')
	for i := 0; i < 8; i++ {
		fmt.Fprintf(tc, "x%d BOGUS\r\n", i)
		if l, _ := br.ReadString('\n'); !strings.HasPrefix(l, fmt.Sprintf("x%d BAD", i)) {
			t.Fatalf("bad command %d: %q", i, l)
		}
	}
	fmt.Fprintf(tc, "x8 BOGUS\r\n")
	br.ReadString('\n')
	if l, _ := br.ReadString('\n'); !strings.HasPrefix(l, "* BYE") {
		t.Fatalf("after the 9th bad command: %q, want BYE", l)
	}
	if err := live.waitClosed(2 * time.Second); err != nil {
		t.Fatalf("session on the old backend after the pin: %v", err)
	}
	if _, b := ta.home(t, user); b != other {
		t.Fatalf("%s logged in on %s after the reload pinned them to %s", user, b, other)
	}

	// A broken file is refused whole, over the admin API this time.
	write(t, ta.path, good+"\n[limits]\nmax_line_length = 12\n[nonsense")
	code, out, stderr := ta.ctl("reload")
	if code != 1 || !strings.Contains(stderr, "422") {
		t.Fatalf("ctl reload of a broken file: exit %d %q %q", code, out, stderr)
	}
	write(t, ta.path, strings.Replace(good, `default = ["b1", "b2"]`, `default = ["b1", "b3"]`, 1))
	if rep := ta.Reload(t.Context()); rep.Result != "refused" || !strings.Contains(rep.Error, "b3") {
		t.Fatalf("reload naming an unknown backend: %+v", rep)
	}
	if _, b := ta.home(t, user); b != other {
		t.Fatalf("after refused reloads %s went to %s, want %s", user, b, other)
	}
	metrics := fetchText(t, ta.admin+"/metrics")
	for result, want := range map[string]float64{"applied": 1, "refused": 2} {
		if v, _ := metricValue(metrics, "imapgate_config_reloads_total", fmt.Sprintf("result=%q", result)); v != want {
			t.Errorf("imapgate_config_reloads_total{result=%q} = %v, want %v", result, v, want)
		}
	}

	// Back to the first file: the pin and the limit go, nothing needs a
	// restart.
	write(t, ta.path, testConfig(b1, b2, ""))
	code, out, _ = ta.ctl("reload")
	if code != 0 || !strings.Contains(out, "changed: limits.max_bad_commands, log.level, routing.users") || strings.Contains(out, "restart") {
		t.Fatalf("ctl reload back: exit %d %q", code, out)
	}
}

func write(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestDrainSpreadsClosesOverWindow(t *testing.T) {
	ta := startTestApp(t)
	const n = 40
	var clients []*opsClient
	for i := range n {
		c, err := opsDial(ta.imap, false)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		u := slices.Sorted(func(yield func(string) bool) {
			for u := range testUsers {
				yield(u)
			}
		})[i%len(testUsers)]
		if err := c.login(u, testUsers[u]); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	closed := make(chan time.Duration, n)
	start := time.Now()
	for _, c := range clients {
		go func() {
			c.waitClosed(10 * time.Second)
			closed <- time.Since(start)
		}()
	}
	ta.shutdown() // drain_window 500ms
	var at []time.Duration
	for range n {
		at = append(at, <-closed)
	}
	slices.Sort(at)
	window := 500 * time.Millisecond
	if at[n-1] > window+300*time.Millisecond {
		t.Errorf("last session closed after %v, window %v", at[n-1], window)
	}
	// Even spread: each fifth of the window closes some sessions.
	buckets := map[int]int{}
	for _, d := range at {
		buckets[min(int(d*5/window), 4)]++
	}
	for i := range 5 {
		if buckets[i] == 0 || buckets[i] > n/2 {
			t.Errorf("closes per fifth of the window: %v (times %v)", buckets, at)
			break
		}
	}
	if ta.Ready() {
		t.Error("ready after shutdown")
	}
}

// TestReloadReplacesTLS: a changed [tls] section takes effect for the next
// handshake, without touching the sessions already running.
func TestReloadReplacesTLS(t *testing.T) {
	ta := startTestApp(t)
	live, _ := ta.home(t, "alice@example.org")
	handshake := func() error {
		c, err := opsDial(ta.imap, false)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.cmd("STARTTLS"); err != nil {
			return err
		}
		tc := tls.Client(c.c, &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS12})
		return tc.Handshake()
	}
	if err := handshake(); err != nil {
		t.Fatalf("TLS 1.2 before the reload: %v", err)
	}
	b1, b2 := ta.cfg.Load().Backends["b1"].Addr, ta.cfg.Load().Backends["b2"].Addr
	write(t, ta.path, testConfig(b1, b2, "[tls]\nmin_version = \"1.3\"\n"))
	if rep := ta.Reload(t.Context()); rep.Result != "applied" || rep.Certificates != "replaced" || !slices.Equal(rep.Applied, []string{"tls.min_version"}) {
		t.Fatalf("reload: %+v", rep)
	}
	if err := handshake(); err == nil {
		t.Fatal("TLS 1.2 handshake succeeded after min_version = 1.3")
	}
	if _, err := live.cmd("NOOP"); err != nil {
		t.Fatalf("live session after the TLS change: %v", err)
	}
}
