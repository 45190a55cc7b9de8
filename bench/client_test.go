package bench

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// scripted serves one connection: for every client line that starts with
// a key of replies, it writes the reply with TAG replaced by the line's
// tag.
func scripted(t *testing.T, replies map[string]string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("* OK test server\r\n"))
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			tag, cmd, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
			verb, _, _ := strings.Cut(cmd, " ")
			reply, ok := replies[verb]
			if !ok {
				reply = "TAG BAD unknown\r\n"
			}
			c.Write([]byte(strings.ReplaceAll(reply, "TAG", tag)))
		}
	}()
	return ln.Addr().String()
}

func TestConnResponses(t *testing.T) {
	body := strings.Repeat("x", 70000) // longer than the read buffer
	addr := scripted(t, map[string]string{
		"LOGIN":  "TAG OK [CAPABILITY IMAP4rev1] Logged in\r\n",
		"SELECT": "* FLAGS (\\Seen)\r\n* 42 EXISTS\r\n* 0 RECENT\r\nTAG OK [READ-WRITE] Select completed\r\n",
		"FETCH":  "* 1 FETCH (UID 7 BODY[] {70000}\r\n" + body + " FLAGS (\\Seen))\r\n* 2 FETCH (BODY[] {3}\r\n}\r\n)\r\nTAG OK Fetch completed\r\n",
		"NOOP":   "TAG NO [UNAVAILABLE] try later\r\n",
		"IDLE":   "+ idling\r\n",
	})
	c, err := (&Dialer{Addr: addr, Security: Cleartext}).Dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(`us"er`, `pa\ss`); err != nil {
		t.Fatal(err)
	}
	rep, err := c.Command("SELECT INBOX")
	if err != nil || rep.Exists != 42 {
		t.Fatalf("SELECT: %+v, %v", rep, err)
	}
	rep, err = c.Command("FETCH 1:* BODY.PEEK[]")
	if err != nil {
		t.Fatal(err)
	}
	if rep.Bytes < 70000 || rep.Bytes > 70200 {
		t.Errorf("FETCH read %d bytes, want about 70,100", rep.Bytes)
	}
	_, err = c.Command("NOOP")
	var se *StatusError
	if !errors.As(err, &se) || se.Reply.Status != "NO" || !strings.HasPrefix(se.Reply.Text, "[UNAVAILABLE]") {
		t.Fatalf("NOOP: %v, want a NO StatusError", err)
	}
	if err := c.Idle(); err != nil {
		t.Fatal(err)
	}
}

func TestLiteralLen(t *testing.T) {
	for line, want := range map[string]int64{
		"* 1 FETCH (BODY[] {123}": 123,
		"a APPEND x {5+}":         5,
		"* OK {no}":               -1,
		"* OK done}":              -1,
		"{0}":                     0,
	} {
		n, ok := literalLen([]byte(line))
		if !ok {
			n = -1
		}
		if n != want {
			t.Errorf("literalLen(%q) = %d, want %d", line, n, want)
		}
	}
}

func TestUsersAndQuote(t *testing.T) {
	u := UsersPattern("bench%d", 3, "p")
	if len(u) != 3 || u[2].User != "bench2" || u[2].Pass != "p" {
		t.Errorf("UsersPattern: %v", u)
	}
	if u := UsersPattern("alice", 5, "p"); len(u) != 1 {
		t.Errorf("a pattern without %%d is one user: %v", u)
	}
	f := filepath.Join(t.TempDir(), "users")
	os.WriteFile(f, []byte("# comment\na@b:pass:with:colons\n\nc:d\n"), 0o600)
	got, err := LoadUsers(f)
	if err != nil || len(got) != 2 || got[0].Pass != "pass:with:colons" {
		t.Errorf("LoadUsers: %v, %v", got, err)
	}
	if q := quote(`a"b\c`); q != `"a\"b\\c"` {
		t.Errorf("quote: %s", q)
	}
}

func TestBudget(t *testing.T) {
	b := newBudget(3, time.Hour)
	n := 0
	for b.take(context.Background()) {
		n++
		if n > 10 {
			break
		}
	}
	if n != 3 {
		t.Errorf("a count of 3 gave %d operations", n)
	}
	b = newBudget(0, 20*time.Millisecond)
	time.Sleep(30 * time.Millisecond)
	if b.take(context.Background()) {
		t.Error("an expired duration still gave an operation")
	}
}

func TestReportFile(t *testing.T) {
	rep := &Report{
		Targets: []string{"imapgate", "haproxy", "direct"},
		Results: []Result{
			{Scenario: "login", Target: "imapgate", Unit: "login", Amount: 100, CPU: time.Second, CPUPerOp: 10 * time.Millisecond},
			{Scenario: "login", Target: "haproxy", Unit: "login", Amount: 100, CPU: time.Second, CPUPerOp: 5 * time.Millisecond},
			{Scenario: "idle", Target: "imapgate", Unit: "session", Open: 9000, RSSBefore: 1 << 20, RSSDuring: 1<<20 + 9000*8<<10, RSSPerSession: 8 << 10},
			{Scenario: "noop", Target: "imapgate", Unit: "round trip", Latency: &Latency{P50: 90 * time.Microsecond}},
			{Scenario: "noop", Target: "nginx", Unit: "round trip", Latency: &Latency{P50: 100 * time.Microsecond}},
		},
	}
	md := rep.Markdown()
	for _, want := range []string{
		"| CPU per login (login, Go's default key exchange) ≤ 1.0× HAProxy's | 10000 µs vs 5000 µs per login = 2.00× | **no** |",
		"| RSS per idle TLS session (idle) ≤ 9 KiB at 9000 sessions | 8.0 KiB (HAProxy 0.0 KiB) | yes |",
		"| NOOP p50 ≤ nginx's | 90 µs vs 100 µs (-10.0 µs) | yes |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	f := filepath.Join(t.TempDir(), "BENCHMARKS.md")
	os.WriteFile(f, []byte("# Benchmarks\n\nprose before\n\n"+BeginMarker+"\nold\n"+EndMarker+"\n\nprose after\n"), 0o644)
	if err := UpdateFile(f, "new table"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(f)
	s := string(b)
	if strings.Contains(s, "old") || !strings.Contains(s, "new table") || !strings.Contains(s, "prose before") || !strings.Contains(s, "prose after") {
		t.Errorf("UpdateFile:\n%s", s)
	}
}

func TestMerge(t *testing.T) {
	a := Result{Scenario: "noop", Amount: 2, Elapsed: time.Second, CPU: 20 * time.Millisecond, samples: []time.Duration{1, 2}}
	b := Result{Scenario: "noop", Amount: 2, Elapsed: time.Second, CPU: 20 * time.Millisecond, samples: []time.Duration{3, 4}}
	m := Merge([]Result{a, b})
	if m.Amount != 4 || m.Rate != 2 || m.CPUPerOp != 10*time.Millisecond || m.Latency == nil || m.Latency.Max != 4 || m.Latency.P50 != 3 {
		t.Errorf("Merge: %+v %+v", m, m.Latency)
	}
	// Each part's own figures are kept, in order: CPU per operation where
	// it was measured, p50 where the part has latencies.
	a.Latency, b.Latency = &Latency{P50: 7}, &Latency{P50: 5}
	c := Result{Scenario: "noop", Amount: 1, Elapsed: time.Second} // no CPU measured
	m = Merge([]Result{a, b, c})
	if !slices.Equal(m.RoundCPUPerOp, []time.Duration{10 * time.Millisecond, 10 * time.Millisecond}) || !slices.Equal(m.RoundP50, []time.Duration{7, 5}) {
		t.Errorf("Merge's rounds: CPU %v, p50 %v", m.RoundCPUPerOp, m.RoundP50)
	}
	if m2 := Merge([]Result{m}); len(m2.RoundCPUPerOp) != 1 {
		t.Errorf("a merged result merged again keeps its parts' rounds: %v", m2.RoundCPUPerOp)
	}
}

// The verdicts give the ratio of each round beside the merged one and say
// when the rounds fall on both sides of the limit; the table has a row of
// the rounds' figures.
func TestReportRounds(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var ds []time.Duration
		for _, x := range v {
			ds = append(ds, time.Duration(x)*time.Microsecond)
		}
		return ds
	}
	rep := &Report{
		Targets: []string{"imapgate", "haproxy", "nginx"},
		Results: []Result{
			{Scenario: "login", Target: "imapgate", Unit: "login", Amount: 300, CPU: 300 * time.Millisecond, CPUPerOp: time.Millisecond, RoundCPUPerOp: ms(900, 1000, 1100)},
			{Scenario: "login", Target: "haproxy", Unit: "login", Amount: 300, CPU: 300 * time.Millisecond, CPUPerOp: time.Millisecond, RoundCPUPerOp: ms(1000, 1000, 1000)},
			{Scenario: "login (X25519 only)", Target: "imapgate", Unit: "login", Amount: 300, CPU: 300 * time.Millisecond, CPUPerOp: time.Millisecond, RoundCPUPerOp: ms(1000, 1000)},
			{Scenario: "login (X25519 only)", Target: "haproxy", Unit: "login", Amount: 300, CPU: 300 * time.Millisecond, CPUPerOp: time.Millisecond, RoundCPUPerOp: ms(1000, 1000, 1000)},
			{Scenario: "fetch-big", Target: "imapgate", Unit: "MiB", Amount: 10, CPU: 7 * time.Millisecond, CPUPerOp: 700 * time.Microsecond, RoundCPUPerOp: ms(690, 710)},
			{Scenario: "fetch-big", Target: "haproxy", Unit: "MiB", Amount: 10, CPU: 10 * time.Millisecond, CPUPerOp: time.Millisecond, RoundCPUPerOp: ms(1000, 1000)},
			{Scenario: "noop", Target: "imapgate", Unit: "round trip", Latency: &Latency{P50: 100 * time.Microsecond}, RoundP50: ms(95, 110)},
			{Scenario: "noop", Target: "nginx", Unit: "round trip", Latency: &Latency{P50: 100 * time.Microsecond}, RoundP50: ms(100, 100)},
		},
	}
	md := rep.Markdown()
	for _, want := range []string{
		"| CPU per login (login, Go's default key exchange) ≤ 1.0× HAProxy's | 1000 µs vs 1000 µs per login = 1.00×; by round 0.90-1.10× | yes (the rounds straddle the limit) |",
		// Rounds that do not pair up give no range.
		"| CPU per login (login (X25519 only)) ≤ 0.9× HAProxy's | 1000 µs vs 1000 µs per login = 1.00× | **no** |",
		"| NOOP p50 ≤ nginx's | 100 µs vs 100 µs (+0.0 µs); by round -5.0 to +10.0 µs | yes (the rounds straddle the limit) |",
		// Every round on the right side: no note.
		"| CPU per MiB (10 MiB message) ≤ 0.8× HAProxy's | 700 µs vs 1000 µs per MiB = 0.70×; by round 0.69-0.71× | yes |",
		"| login: proxy CPU per login, by round | 900 µs / 1000 µs / 1100 µs | 1000 µs / 1000 µs / 1000 µs |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}
