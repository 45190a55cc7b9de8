package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Scenarios are the names Run accepts, in the order a full run uses.
var Scenarios = []string{"login", "fetch", "noop", "idle"}

// Credential is one user's login.
type Credential struct {
	User, Pass string
}

// UsersPattern returns n credentials from a pattern: "bench%d" with n=3 is
// bench0, bench1 and bench2, all with pass. A pattern without %d is one
// user, whatever n.
func UsersPattern(pattern string, n int, pass string) []Credential {
	if !strings.Contains(pattern, "%d") || n < 1 {
		return []Credential{{pattern, pass}}
	}
	out := make([]Credential, n)
	for i := range out {
		out[i] = Credential{fmt.Sprintf(pattern, i), pass}
	}
	return out
}

// LoadUsers reads "user:password" lines (split at the first colon; blank
// lines and lines starting with # are skipped).
func LoadUsers(path string) ([]Credential, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Credential
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if line == "" || line[0] == '#' {
			continue
		}
		u, p, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("%s: line %q is not user:password", path, line)
		}
		out = append(out, Credential{u, p})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no users", path)
	}
	return out, nil
}

// Options configure a scenario run. Zero values mean the defaults given.
type Options struct {
	// Target labels the results (e.g. "imapgate", "haproxy", "direct").
	Target string
	// Dialer reaches the server under test.
	Dialer Dialer
	// Users are the logins; session i uses Users[i % len(Users)].
	// Required.
	Users []Credential
	// Workers is how many clients run at once: login loops, FETCH
	// sessions, or openers of idle sessions. Zero means 4 for login, 1
	// for fetch, 32 for idle.
	Workers int
	// Duration bounds login, noop and each half of fetch when Count is
	// zero. Zero means 10 s.
	Duration time.Duration
	// Count, if positive, is the number of logins, NOOP round trips or
	// FETCH repetitions instead of a duration.
	Count int
	// Proc, if set, is the proxy process whose CPU time (and, for idle,
	// memory) is measured around the scenario.
	Proc *Proc
	// Fetch shapes the fetch scenario.
	Fetch FetchOptions
	// Idle shapes the idle scenario.
	Idle IdleOptions
	// Logf, if set, receives progress lines.
	Logf func(format string, args ...any)
}

// FetchOptions shape the fetch scenario's mailboxes.
type FetchOptions struct {
	// BigSize is the size of the one message in mailbox "bench-big". Zero
	// means 10 MiB.
	BigSize int
	// SmallCount and SmallSize make mailbox "bench-small". Zero means
	// 1,000 messages of 8 KiB.
	SmallCount, SmallSize int
}

// IdleOptions shape the idle scenario.
type IdleOptions struct {
	// Sessions is how many sessions to open and leave in IDLE. Zero
	// means 500.
	Sessions int
	// Rate caps how many sessions are opened per second (Dovecot needs
	// time to move idle sessions into imap-hibernate). Zero means no cap.
	Rate float64
	// Settle is how long to wait after the last session is open before
	// memory is read. Zero means 5 s.
	Settle time.Duration
	// Hold is how long the sessions stay open after that (Ready runs at
	// its start). Zero means 5 s.
	Hold time.Duration
	// Ready, if set, is called once every session is open and settled,
	// before the hold: the profile harness takes its snapshots here.
	Ready func(open int)
	// Append, if positive, makes each session APPEND a message of this
	// many bytes to its SentMailbox before IDLE, as a client that just saved a
	// sent message does: a proxy that keeps the buffers a big upload grew
	// shows it here.
	Append int
}

// Latency summarises a set of timings.
type Latency struct {
	Mean time.Duration `json:"mean_ns"`
	P50  time.Duration `json:"p50_ns"`
	P90  time.Duration `json:"p90_ns"`
	P99  time.Duration `json:"p99_ns"`
	Max  time.Duration `json:"max_ns"`
}

func summarise(d []time.Duration) *Latency {
	if len(d) == 0 {
		return nil
	}
	slices.Sort(d)
	var sum time.Duration
	for _, v := range d {
		sum += v
	}
	q := func(p float64) time.Duration { return d[min(len(d)-1, int(p*float64(len(d))))] }
	return &Latency{Mean: sum / time.Duration(len(d)), P50: q(0.50), P90: q(0.90), P99: q(0.99), Max: d[len(d)-1]}
}

// Result is one measured scenario against one target.
type Result struct {
	Scenario string `json:"scenario"` // login, fetch-big, fetch-small, noop, idle
	Target   string `json:"target,omitempty"`
	// Unit is what one operation is: "login", "MiB", "round trip" or
	// "session"; Amount is how many were done and Rate how many per
	// second.
	Unit       string        `json:"unit"`
	Amount     float64       `json:"amount"`
	Rate       float64       `json:"rate"`
	Elapsed    time.Duration `json:"elapsed_ns"`
	Errors     int64         `json:"errors"`
	FirstError string        `json:"first_error,omitempty"`
	Latency    *Latency      `json:"latency,omitempty"`
	TLS        string        `json:"tls,omitempty"`
	// CPU is the measured process's user+system CPU time during the
	// scenario, and CPUPerOp that divided by Amount. Zero without Proc.
	CPU      time.Duration `json:"proxy_cpu_ns,omitempty"`
	CPUPerOp time.Duration `json:"proxy_cpu_per_op_ns,omitempty"`
	// SysCPU is the system (kernel) part of CPU.
	SysCPU time.Duration `json:"proxy_sys_cpu_ns,omitempty"`
	// ClientCPU is the load generator's own CPU time.
	ClientCPU time.Duration `json:"client_cpu_ns"`
	// Idle only: the proxy's RSS before the sessions were opened and
	// while all were open, and the difference per open session.
	Open          int   `json:"open,omitempty"`
	Alive         int   `json:"alive,omitempty"`
	RSSBefore     int64 `json:"rss_before,omitempty"`
	RSSDuring     int64 `json:"rss_during,omitempty"`
	RSSPerSession int64 `json:"rss_per_session,omitempty"`
	FDsDuring     int   `json:"fds_during,omitempty"`
	// Merged results only: each part's CPUPerOp (where it was measured)
	// and latency p50 (where it has latencies), in the order merged. The
	// rounds of a run visit the targets in turn, so round i of two targets
	// ran within the same minute: their ratio is what the run can tell.
	RoundCPUPerOp []time.Duration `json:"proxy_cpu_per_op_rounds_ns,omitempty"`
	RoundP50      []time.Duration `json:"p50_rounds_ns,omitempty"`
	// samples are the raw latencies where a scenario keeps them, for Merge.
	samples []time.Duration
}

// errs collects a count and the first error of concurrent work.
type errs struct {
	n     atomic.Int64
	once  sync.Once
	first string
}

func (e *errs) add(err error) {
	e.n.Add(1)
	e.once.Do(func() { e.first = err.Error() })
}

// meter brackets a scenario with CPU readings of the proxy and of this
// process.
type meter struct {
	proc            *Proc
	cpu0, sys0, me0 time.Duration
	start           time.Time
}

func startMeter(p *Proc) (*meter, error) {
	m := &meter{proc: p, me0: selfCPU(), start: time.Now()}
	if p != nil {
		u, sys, err := p.Times()
		if err != nil {
			return nil, err
		}
		m.cpu0, m.sys0 = u+sys, sys
	}
	return m, nil
}

// stop fills r's time and CPU fields; r.Amount must be set.
func (m *meter) stop(r *Result) error {
	r.Elapsed = time.Since(m.start)
	r.ClientCPU = selfCPU() - m.me0
	if r.Elapsed > 0 {
		r.Rate = r.Amount / r.Elapsed.Seconds()
	}
	if m.proc == nil {
		return nil
	}
	u, sys, err := m.proc.Times()
	if err != nil {
		return err
	}
	r.CPU, r.SysCPU = u+sys-m.cpu0, sys-m.sys0
	if r.Amount > 0 {
		r.CPUPerOp = time.Duration(float64(r.CPU) / r.Amount)
	}
	return nil
}

// Run runs one scenario ("login", "fetch", "noop" or "idle"). Fetch
// returns two results (the big message, the many small ones).
func Run(ctx context.Context, scenario string, o Options) ([]Result, error) {
	if len(o.Users) == 0 {
		return nil, errors.New("bench: no users")
	}
	if o.Duration <= 0 {
		o.Duration = 10 * time.Second
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	var (
		rs  []Result
		err error
	)
	switch scenario {
	case "login":
		var r Result
		r, err = runLogin(ctx, o)
		rs = []Result{r}
	case "fetch":
		rs, err = runFetch(ctx, o)
	case "noop":
		var r Result
		r, err = runNoop(ctx, o)
		rs = []Result{r}
	case "idle":
		var r Result
		r, err = runIdle(ctx, o)
		rs = []Result{r}
	default:
		return nil, fmt.Errorf("bench: unknown scenario %q (want one of %s)", scenario, strings.Join(Scenarios, ", "))
	}
	for i := range rs {
		rs[i].Target = o.Target
	}
	return rs, err
}

// budget hands out operations until a count or a deadline runs out.
type budget struct {
	limited  bool
	left     atomic.Int64
	deadline time.Time
}

func newBudget(count int, d time.Duration) *budget {
	b := &budget{deadline: time.Now().Add(d)}
	if count > 0 {
		b.limited = true
		b.left.Store(int64(count))
		b.deadline = time.Now().Add(24 * time.Hour)
	}
	return b
}

func (b *budget) take(ctx context.Context) bool {
	if ctx.Err() != nil || time.Now().After(b.deadline) {
		return false
	}
	return !b.limited || b.left.Add(-1) >= 0
}

func tlsDesc(st tls.ConnectionState) string {
	if !st.HandshakeComplete {
		return ""
	}
	return fmt.Sprintf("%s %s %s", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite), st.CurveID)
}

// runLogin is the login cycle: connect, TLS, LOGIN, SELECT INBOX, LOGOUT.
func runLogin(ctx context.Context, o Options) (Result, error) {
	workers := o.Workers
	if workers <= 0 {
		workers = 4
	}
	r := Result{Scenario: "login", Unit: "login"}
	var (
		e       errs
		mu      sync.Mutex
		lat     []time.Duration
		tlsInfo string
		done    atomic.Int64
		resumed atomic.Int64
		wg      sync.WaitGroup
	)
	b := newBudget(o.Count, o.Duration)
	m, err := startMeter(o.Proc)
	if err != nil {
		return r, err
	}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for i := w; b.take(ctx); i += workers {
				t0 := time.Now()
				st, err := loginCycle(ctx, &o.Dialer, o.Users[i%len(o.Users)])
				if err != nil {
					e.add(err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				mine = append(mine, time.Since(t0))
				done.Add(1)
				if st.DidResume {
					resumed.Add(1)
				}
				if i == w {
					mu.Lock()
					tlsInfo = tlsDesc(st)
					mu.Unlock()
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	r.Amount = float64(done.Load())
	if err := m.stop(&r); err != nil {
		return r, err
	}
	r.Errors, r.FirstError = e.n.Load(), e.first
	r.samples = lat
	r.Latency = summarise(slices.Clone(lat))
	r.TLS = tlsInfo
	if n := resumed.Load(); n > 0 {
		// A client with a session cache: say how many logins resumed.
		r.TLS = fmt.Sprintf("%s, %.0f%% resumed", tlsInfo, 100*float64(n)/max(r.Amount, 1))
	}
	return r, nil
}

func loginCycle(ctx context.Context, d *Dialer, cr Credential) (tls.ConnectionState, error) {
	c, err := d.Dial(ctx)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := c.Login(cr.User, cr.Pass); err != nil {
		return c.TLS, err
	}
	if _, err := c.Command("SELECT INBOX"); err != nil {
		return c.TLS, err
	}
	if _, err := c.Command("LOGOUT"); err != nil {
		return c.TLS, err
	}
	return c.TLS, nil
}

// loggedIn dials and logs in as cr, with mailbox selected if not empty.
func loggedIn(ctx context.Context, d Dialer, cr Credential, mailbox string) (*Conn, Reply, error) {
	c, err := d.Dial(ctx)
	if err != nil {
		return nil, Reply{}, err
	}
	if err := c.Login(cr.User, cr.Pass); err != nil {
		c.Close()
		return nil, Reply{}, err
	}
	var rep Reply
	if mailbox != "" {
		if rep, err = c.Command("SELECT " + quote(mailbox)); err != nil {
			c.Close()
			return nil, rep, err
		}
	}
	return c, rep, nil
}

// Mailbox names the fetch scenario uses.
const (
	BigMailbox   = "bench-big"
	SmallMailbox = "bench-small"
	// SentMailbox receives the idle scenario's APPENDs.
	SentMailbox = "bench-sent"
)

func (f *FetchOptions) defaults() {
	if f.BigSize <= 0 {
		f.BigSize = 10 << 20
	}
	if f.SmallCount <= 0 {
		f.SmallCount = 1000
	}
	if f.SmallSize <= 0 {
		f.SmallSize = 8 << 10
	}
}

// Prepare makes sure the fetch mailboxes of cr hold what fetch expects,
// appending the messages if not. Run it directly against the backend:
// uploading through a proxy would count towards nothing.
func Prepare(ctx context.Context, d Dialer, cr Credential, f FetchOptions) error {
	f.defaults()
	c, _, err := loggedIn(ctx, d, cr, "")
	if err != nil {
		return err
	}
	defer c.Close()
	fill := func(box string, n, size int) error {
		rep, err := c.Command("EXAMINE " + quote(box))
		if err == nil && rep.Exists == n {
			return nil
		}
		if err == nil {
			// Wrong content: start again.
			if _, err := c.Command("CLOSE"); err != nil {
				return err
			}
			if _, err := c.Command("DELETE " + quote(box)); err != nil {
				return err
			}
		}
		if _, err := c.Command("CREATE " + quote(box)); err != nil {
			return err
		}
		rng := rand.New(rand.NewPCG(uint64(n), uint64(size)))
		for i := range n {
			if err := c.Append(box, message(rng, i, size)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := fill(BigMailbox, 1, f.BigSize); err != nil {
		return fmt.Errorf("prepare %s: %w", BigMailbox, err)
	}
	if err := fill(SmallMailbox, f.SmallCount, f.SmallSize); err != nil {
		return fmt.Errorf("prepare %s: %w", SmallMailbox, err)
	}
	_, err = c.Command("LOGOUT")
	return err
}

// message makes a plain-text message of about size bytes whose body is
// random printable lines (incompressible enough to be honest).
func message(rng *rand.Rand, i, size int) []byte {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	b := make([]byte, 0, size+80)
	b = fmt.Appendf(b, "From: bench@example.org\r\nTo: bench@example.org\r\nSubject: benchmark message %d\r\n"+
		"Message-ID: <%d.%d@bench.imapgate>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"+
		"Content-Type: text/plain; charset=us-ascii\r\n\r\n", i, i, size)
	for len(b) < size {
		for range min(76, max(1, size-len(b)-2)) {
			b = append(b, alphabet[rng.IntN(len(alphabet))])
		}
		b = append(b, '\r', '\n')
	}
	return b
}

// runFetch fetches the big message, then the whole small mailbox, again
// and again, on Workers sessions at once.
func runFetch(ctx context.Context, o Options) ([]Result, error) {
	o.Fetch.defaults()
	workers := o.Workers
	if workers <= 0 {
		workers = 1
	}
	if o.Dialer.ReadBuffer == 0 {
		o.Dialer.ReadBuffer = 64 << 10
	}
	conns := make([]*Conn, workers)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	for i := range conns {
		c, _, err := loggedIn(ctx, o.Dialer, o.Users[0], "")
		if err != nil {
			return nil, err
		}
		conns[i] = c
	}
	half := func(name, box, cmd string, want int) (Result, error) {
		r := Result{Scenario: name, Unit: "MiB", TLS: tlsDesc(conns[0].TLS)}
		for _, c := range conns {
			rep, err := c.Command("EXAMINE " + quote(box))
			if err != nil {
				return r, err
			}
			if rep.Exists != want {
				return r, fmt.Errorf("%s holds %d messages, want %d: run Prepare first", box, rep.Exists, want)
			}
			// One untimed round to warm Dovecot's caches and the TLS
			// buffers.
			if _, err := c.Command(cmd); err != nil {
				return r, err
			}
		}
		var (
			e     errs
			bytes atomic.Int64
			wg    sync.WaitGroup
			mu    sync.Mutex
			lat   []time.Duration
		)
		b := newBudget(o.Count, o.Duration)
		m, err := startMeter(o.Proc)
		if err != nil {
			return r, err
		}
		for _, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for b.take(ctx) {
					t0 := time.Now()
					rep, err := c.Command(cmd)
					if err != nil {
						e.add(err)
						return
					}
					d := time.Since(t0)
					bytes.Add(rep.Bytes)
					mu.Lock()
					lat = append(lat, d)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		r.Amount = float64(bytes.Load()) / (1 << 20)
		if err := m.stop(&r); err != nil {
			return r, err
		}
		r.Errors, r.FirstError = e.n.Load(), e.first
		r.Latency = summarise(lat)
		return r, nil
	}
	big, err := half("fetch-big", BigMailbox, "FETCH 1 BODY.PEEK[]", 1)
	if err != nil {
		return []Result{big}, err
	}
	o.Logf("%s fetch-big: %.0f MiB/s", o.Target, big.Rate)
	small, err := half("fetch-small", SmallMailbox, "FETCH 1:* BODY.PEEK[]", o.Fetch.SmallCount)
	return []Result{big, small}, err
}

// runNoop times NOOP round trips on one logged-in session.
func runNoop(ctx context.Context, o Options) (Result, error) {
	r := Result{Scenario: "noop", Unit: "round trip"}
	c, _, err := loggedIn(ctx, o.Dialer, o.Users[0], "INBOX")
	if err != nil {
		return r, err
	}
	defer c.Close()
	r.TLS = tlsDesc(c.TLS)
	for range 200 { // warm-up, untimed
		if _, err := c.Command("NOOP"); err != nil {
			return r, err
		}
	}
	var e errs
	lat := make([]time.Duration, 0, max(o.Count, 10000))
	b := newBudget(o.Count, o.Duration)
	m, err := startMeter(o.Proc)
	if err != nil {
		return r, err
	}
	for b.take(ctx) {
		t0 := time.Now()
		if _, err := c.Command("NOOP"); err != nil {
			e.add(err)
			break
		}
		lat = append(lat, time.Since(t0))
	}
	r.Amount = float64(len(lat))
	if err := m.stop(&r); err != nil {
		return r, err
	}
	r.Errors, r.FirstError = e.n.Load(), e.first
	r.samples = lat
	r.Latency = summarise(slices.Clone(lat))
	return r, nil
}

// Merge adds up results of the same scenario and target measured in
// several rounds (interleaved with other targets, so that a noisy minute
// does not land on one target only): amounts, times and CPU add up, and
// latencies are summarised over every sample when the rounds kept them
// (noop does), else the last round's summary stands.
func Merge(rs []Result) Result {
	if len(rs) == 0 {
		return Result{}
	}
	m := rs[0]
	m.samples = slices.Clone(m.samples)
	m.RoundCPUPerOp, m.RoundP50 = nil, nil
	for _, r := range rs {
		if r.CPU > 0 && r.Amount > 0 {
			m.RoundCPUPerOp = append(m.RoundCPUPerOp, time.Duration(float64(r.CPU)/r.Amount))
		}
		if r.Latency != nil {
			m.RoundP50 = append(m.RoundP50, r.Latency.P50)
		}
	}
	for _, r := range rs[1:] {
		m.Amount += r.Amount
		m.Elapsed += r.Elapsed
		m.Errors += r.Errors
		if m.FirstError == "" {
			m.FirstError = r.FirstError
		}
		m.CPU += r.CPU
		m.SysCPU += r.SysCPU
		m.ClientCPU += r.ClientCPU
		m.samples = append(m.samples, r.samples...)
		if r.Latency != nil {
			m.Latency = r.Latency
		}
	}
	if m.Elapsed > 0 {
		m.Rate = m.Amount / m.Elapsed.Seconds()
	}
	if m.Amount > 0 {
		m.CPUPerOp = time.Duration(float64(m.CPU) / m.Amount)
	}
	if len(m.samples) > 0 {
		m.Latency = summarise(slices.Clone(m.samples))
	}
	return m
}

// runIdle opens Idle.Sessions logged-in sessions in IDLE, holds them, and
// reads the proxy's memory before and while they are open.
func runIdle(ctx context.Context, o Options) (Result, error) {
	idl := o.Idle
	if idl.Sessions <= 0 {
		idl.Sessions = 500
	}
	if idl.Settle <= 0 {
		idl.Settle = 5 * time.Second
	}
	if idl.Hold <= 0 {
		idl.Hold = 5 * time.Second
	}
	workers := o.Workers
	if workers <= 0 {
		workers = 32
	}
	r := Result{Scenario: "idle", Unit: "session"}
	var appendMsg []byte
	if idl.Append > 0 {
		appendMsg = message(rand.New(rand.NewPCG(1, 2)), 0, idl.Append)
	}
	if o.Proc != nil {
		rss, err := o.Proc.RSS()
		if err != nil {
			return r, err
		}
		r.RSSBefore = rss
	}
	m, err := startMeter(o.Proc)
	if err != nil {
		return r, err
	}

	conns := make([]*Conn, idl.Sessions)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	jobs := make(chan int)
	go func() {
		defer close(jobs)
		var tick <-chan time.Time
		if idl.Rate > 0 {
			t := time.NewTicker(time.Duration(float64(time.Second) / idl.Rate))
			defer t.Stop()
			tick = t.C
		}
		for i := range conns {
			if tick != nil {
				select {
				case <-tick:
				case <-ctx.Done():
					return
				}
			}
			select {
			case jobs <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	var (
		e       errs
		wg      sync.WaitGroup
		opened  atomic.Int64
		tlsOnce sync.Once
	)
	progress := time.Now()
	var pmu sync.Mutex
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				c, _, err := loggedIn(ctx, o.Dialer, o.Users[i%len(o.Users)], "INBOX")
				if err == nil && appendMsg != nil {
					// To a Sent folder, as a client saving a sent message
					// does: an APPEND to INBOX would wake every other
					// session of the user IDLE there (and, in Dovecot,
					// unhibernate them all at once).
					if _, cerr := c.Command("CREATE " + SentMailbox); cerr != nil && !errors.As(cerr, new(*StatusError)) {
						err = cerr
					}
					if err == nil {
						err = c.Append(SentMailbox, appendMsg)
					}
					if err != nil {
						c.Close()
					}
				}
				if err == nil {
					if err = c.Idle(); err != nil {
						c.Close()
					}
				}
				if err != nil {
					e.add(fmt.Errorf("session %d: %w", i, err))
					continue
				}
				tlsOnce.Do(func() { r.TLS = tlsDesc(c.TLS) })
				conns[i] = c
				n := opened.Add(1)
				pmu.Lock()
				if time.Since(progress) > 5*time.Second {
					progress = time.Now()
					o.Logf("%s idle: %d of %d sessions open", o.Target, n, idl.Sessions)
				}
				pmu.Unlock()
			}
		}()
	}
	wg.Wait()
	r.Open = int(opened.Load())
	r.Amount = float64(r.Open)
	if err := m.stop(&r); err != nil { // CPU per session opened
		return r, err
	}
	r.Errors, r.FirstError = e.n.Load(), e.first
	o.Logf("%s idle: %d sessions open (%d errors) in %v; settling %v", o.Target, r.Open, r.Errors, r.Elapsed.Round(time.Millisecond), idl.Settle)

	sleep(ctx, idl.Settle)
	if idl.Ready != nil {
		idl.Ready(r.Open)
	}
	sleep(ctx, idl.Hold)
	if o.Proc != nil {
		rss, err := o.Proc.RSS()
		if err != nil {
			return r, err
		}
		r.RSSDuring = rss
		r.FDsDuring, _ = o.Proc.FDs()
		if r.Open > 0 {
			r.RSSPerSession = (r.RSSDuring - r.RSSBefore) / int64(r.Open)
		}
	}
	r.Alive = countAlive(conns)
	return r, nil
}

// countAlive checks that the sessions survived the hold: a read that
// times out means the connection is still open (an untagged "* OK Still
// here" counts as alive too).
func countAlive(conns []*Conn) int {
	var (
		alive atomic.Int64
		wg    sync.WaitGroup
		sem   = make(chan struct{}, 512)
	)
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c.SetDeadline(time.Now().Add(100 * time.Millisecond))
			_, err := c.r.Peek(1)
			var ne interface{ Timeout() bool }
			if err == nil || errors.As(err, &ne) && ne.Timeout() {
				alive.Add(1)
			}
		}()
	}
	wg.Wait()
	return int(alive.Load())
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
