// Package profile profiles imapgate's proxy package in-process under the
// load of cmd/imapgate-bench (run as a separate process, so its own
// allocations and CPU stay out of the profiles): where the CPU of a login
// and of bulk transfer goes, and what an idle spliced TLS session holds.
//
// It is opt-in, like the report in package bench:
//
//	IMAPGATE_BENCH_PROFILE=1 go test -run '^TestProfile$' -count=1 -timeout 30m -v ./bench/profile
//
// Profiles and pprof listings are written to $IMAPGATE_PROFILE_DIR
// (default /tmp/imapgate-profile); the test log has the summary.
// IMAPGATE_PROFILE_ONLY picks scenarios (login, login-x25519,
// login-resume, fetch, idle, idle-append) and
// IMAPGATE_PROFILE_LOGIN_DURATION sets the length of each login one.
// BenchmarkServerHandshake (handshake_test.go) is the TLS handshake alone.
package profile

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapgate/imapgate/bench"
	"github.com/imapgate/imapgate/internal/testenv"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

const benchPass = "benchpass"

func TestProfile(t *testing.T) {
	if os.Getenv("IMAPGATE_BENCH_PROFILE") != "1" {
		t.Skip("profile: set IMAPGATE_BENCH_PROFILE=1")
	}
	testenv.Need(t, "dovecot")
	sessions := 2000
	if v := os.Getenv("IMAPGATE_PROFILE_SESSIONS"); v != "" {
		sessions, _ = strconv.Atoi(v)
	}
	dir := os.Getenv("IMAPGATE_PROFILE_DIR")
	if dir == "" {
		dir = "/tmp/imapgate-profile"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	creds := bench.UsersPattern("bench%d", 200, benchPass)
	users := map[string]string{}
	for _, c := range creds {
		users[c.User] = c.Pass
	}
	d := testenv.StartDovecot(t, testenv.DovecotOptions{Users: users, TrustedNetworks: "127.0.0.0/8", Extra: bench.DovecotExtra})
	if err := bench.Prepare(ctx, bench.Dialer{Addr: d.Addr, Security: bench.Cleartext}, creds[0], bench.FetchOptions{}); err != nil {
		t.Fatal(err)
	}

	gen := filepath.Join(t.TempDir(), "imapgate-bench")
	if out, err := exec.Command("go", "build", "-o", gen, "github.com/imapgate/imapgate/cmd/imapgate-bench").CombinedOutput(); err != nil {
		t.Fatalf("build imapgate-bench: %v\n%s", err, out)
	}

	// The proxy as the binary runs it, minus config plumbing: production
	// JSON logging to a file, one backend, no per-IP limit.
	logFile, err := os.Create(filepath.Join(dir, "proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	// Buffered as cmd/imapgate's (64 KiB, flushed every 250 ms).
	ws := &zapcore.BufferedWriteSyncer{WS: logFile, Size: 64 << 10, FlushInterval: 250 * time.Millisecond}
	defer ws.Stop()
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), ws, zap.InfoLevel), zap.AddCaller())
	backend := &routing.Backend{ID: "dovecot", Addr: d.Addr}
	srv, err := proxy.NewServer(proxy.Options{
		Router: routing.RouterFunc(func(context.Context, string) (*routing.Backend, error) { return backend, nil }),
		TLS:    &tls.Config{Certificates: []tls.Certificate{d.CA.ServerCert}},
		Logger: log,
		Limits: proxy.Limits{MaxConnectionsPerIP: -1},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln, proxy.Listener{Mode: proxy.ImplicitTLS})
	defer srv.Close()

	args := []string{"-addr", ln.Addr().String(), "-ca", d.CA.CAFile, "-servername", "localhost",
		"-user", "bench%d", "-users", "200", "-pass", benchPass, "-json"}
	self := bench.Proc{PID: os.Getpid()}

	// CPU first, at the default heap sampling rate.
	cpuProfile := func(name string, extra ...string) {
		f, err := os.Create(filepath.Join(dir, name+".cpu.pprof"))
		if err != nil {
			t.Fatal(err)
		}
		writeProfile(t, "allocs", filepath.Join(dir, name+"-base.allocs.pprof"))
		c0, _ := self.CPU()
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(gen, append(append([]string{}, args...), extra...)...).Output()
		pprof.StopCPUProfile()
		f.Close()
		c1, _ := self.CPU()
		if err != nil {
			t.Fatalf("%s: %v\n%s", name, err, out)
		}
		// One CPU reading covers the whole run: fetch's two halves are
		// added up.
		var amount float64
		var unit string
		for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
			var r bench.Result
			if json.Unmarshal([]byte(line), &r) != nil || r.Amount == 0 {
				continue
			}
			t.Logf("%s %s: %.0f %s in %v", name, r.Scenario, r.Amount, r.Unit, r.Elapsed.Round(time.Millisecond))
			amount += r.Amount
			unit = r.Unit
		}
		if amount > 0 {
			t.Logf("%s: proxy (this process) CPU %v = %v per %s", name, (c1 - c0).Round(time.Millisecond),
				time.Duration(float64(c1-c0)/amount).Round(time.Microsecond), unit)
		}
		t.Logf("%s CPU profile:\n%s", name, pprofTop(t, dir, name+".cpu.top", "-top", "-nodecount=35", f.Name()))
		pprofTop(t, dir, name+".cpu.cum", "-top", "-cum", "-nodecount=60", f.Name())
		// What the scenario allocated (sampled at the default rate).
		allocs := filepath.Join(dir, name+".allocs.pprof")
		writeProfile(t, "allocs", allocs)
		pprofTop(t, dir, name+".allocs.top", "-top", "-sample_index=alloc_space", "-nodecount=40",
			"-diff_base", filepath.Join(dir, name+"-base.allocs.pprof"), allocs)
	}
	// IMAPGATE_PROFILE_ONLY picks some of login, login-x25519,
	// login-resume, fetch, idle, idle-append (default: all).
	only := os.Getenv("IMAPGATE_PROFILE_ONLY")
	want := func(name string) bool {
		return only == "" || slices.Contains(strings.Split(only, ","), name)
	}
	loginDuration := "15s"
	if v := os.Getenv("IMAPGATE_PROFILE_LOGIN_DURATION"); v != "" {
		loginDuration = v
	}
	login := []string{"-scenario", "login", "-workers", "8", "-duration", loginDuration}
	if want("login") {
		cpuProfile("login", login...)
	}
	if want("login-x25519") {
		cpuProfile("login-x25519", append(login, "-curves", "X25519")...)
	}
	if want("login-resume") {
		cpuProfile("login-resume", append(login, "-resume")...)
	}
	if want("fetch") {
		cpuProfile("fetch", "-scenario", "fetch", "-duration", "8s")
	}

	// Then an idle session's memory, every allocation sampled.
	runtime.MemProfileRate = 1
	if want("idle") {
		idle(t, dir, "idle", gen, args, sessions, self)
	}
	// The same after each session uploaded 64 KiB (APPEND) before IDLE.
	if want("idle-append") {
		idle(t, dir, "idle-append", gen, append(append([]string{}, args...), "-append", "65536"), sessions, self)
	}
}

// snapshot is the process's memory at one moment, after a GC.
type snapshot struct {
	ms         runtime.MemStats
	goroutines int
	rss        int64
}

func take(t *testing.T, self bench.Proc, heapFile string) snapshot {
	// Each GC halves at most the stacks that use under a quarter of their
	// size; six of them reach the floor a long-idle process (forced GC
	// every two minutes) gets to.
	for range 6 {
		runtime.GC()
	}
	var s snapshot
	runtime.ReadMemStats(&s.ms)
	s.goroutines = runtime.NumGoroutine()
	s.rss, _ = self.RSS()
	f, err := os.Create(heapFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
	return s
}

func idle(t *testing.T, dir, name, gen string, args []string, n int, self bench.Proc) {
	base := take(t, self, filepath.Join(dir, name+"-base.heap.pprof"))
	cmd := exec.Command(gen, append(append([]string{}, args...),
		"-scenario", "idle", "-sessions", strconv.Itoa(n), "-rate", "400", "-workers", "32", "-settle", "3s", "-hold", "10m")...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout strings.Builder
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	ready := false
	for sc.Scan() {
		t.Log(sc.Text())
		if strings.Contains(sc.Text(), "ready:") {
			ready = true
			break
		}
	}
	if !ready {
		cmd.Wait()
		t.Fatalf("imapgate-bench ended before its sessions were open\n%s", stdout.String())
	}
	open := n
	if f := strings.Fields(sc.Text()); len(f) >= 3 {
		open, _ = strconv.Atoi(f[2])
	}
	during := take(t, self, filepath.Join(dir, name+".heap.pprof"))
	if f, err := os.Create(filepath.Join(dir, name+".goroutines.txt")); err == nil {
		pprof.Lookup("goroutine").WriteTo(f, 1)
		f.Close()
	}
	// Done: the generator closes its sessions on SIGTERM and exits.
	cmd.Process.Signal(syscall.SIGTERM)
	go func() {
		for sc.Scan() {
		}
	}()
	cmd.Wait()

	per := func(a, b uint64) string { return fmt.Sprintf("%.2f KiB", (float64(b)-float64(a))/float64(open)/1024) }
	t.Logf("%s: %d sessions open; per session after GC:", name, open)
	t.Logf("  goroutines       %d → %d (%.2f per session)", base.goroutines, during.goroutines, float64(during.goroutines-base.goroutines)/float64(open))
	t.Logf("  HeapInuse        %s  (HeapAlloc %s, %.1f objects)", per(base.ms.HeapInuse, during.ms.HeapInuse), per(base.ms.HeapAlloc, during.ms.HeapAlloc), (float64(during.ms.HeapObjects)-float64(base.ms.HeapObjects))/float64(open))
	t.Logf("  StackInuse       %s", per(base.ms.StackInuse, during.ms.StackInuse))
	t.Logf("  Sys (from OS)    %s", per(base.ms.Sys, during.ms.Sys))
	t.Logf("  RSS              %s  (%.1f → %.1f MiB; includes the test's Dovecot client code, not the generator)", per(uint64(base.rss), uint64(during.rss)), float64(base.rss)/(1<<20), float64(during.rss)/(1<<20))
	heap := filepath.Join(dir, name+".heap.pprof")
	baseHeap := filepath.Join(dir, name+"-base.heap.pprof")
	t.Logf("heap in use by the open sessions (diff against before):\n%s",
		pprofTop(t, dir, name+".heap.top", "-top", "-sample_index=inuse_space", "-nodecount=40", "-diff_base", baseHeap, heap))
	pprofTop(t, dir, name+".heap.lines", "-top", "-lines", "-sample_index=inuse_space", "-nodecount=60", "-diff_base", baseHeap, heap)
	pprofTop(t, dir, name+".heap.traces", "-traces", "-sample_index=inuse_space", "-diff_base", baseHeap, heap)
}

// writeProfile writes the named runtime profile to file. The allocation
// profile is as of the last GC: one is forced first.
func writeProfile(t *testing.T, profile, file string) {
	runtime.GC()
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup(profile).WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
}

// pprofTop runs go tool pprof with args, saves the output as dir/name and
// returns its first lines.
func pprofTop(t *testing.T, dir, name string, args ...string) string {
	out, err := exec.Command("go", append([]string{"tool", "pprof"}, args...)...).CombinedOutput()
	if err != nil {
		t.Logf("pprof %v: %v", args, err)
	}
	os.WriteFile(filepath.Join(dir, name), out, 0o644)
	lines := strings.Split(string(out), "\n")
	if len(lines) > 50 {
		lines = lines[:50]
	}
	return strings.Join(lines, "\n")
}
