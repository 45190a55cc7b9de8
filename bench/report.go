package bench

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// Describe is one human-readable line for a result.
func Describe(r Result) string {
	var b strings.Builder
	label := r.Scenario
	if r.Target != "" {
		label = r.Target + " " + label
	}
	fmt.Fprintf(&b, "%-24s", label)
	switch r.Unit {
	case "MiB":
		fmt.Fprintf(&b, " %8.1f MiB/s  %.0f MiB in %v", r.Rate, r.Amount, r.Elapsed.Round(time.Millisecond))
	case "session":
		fmt.Fprintf(&b, " %d sessions open (%d alive after the hold) in %v", r.Open, r.Alive, r.Elapsed.Round(time.Millisecond))
	default:
		fmt.Fprintf(&b, " %8.1f %ss/s  %.0f in %v", r.Rate, r.Unit, r.Amount, r.Elapsed.Round(time.Millisecond))
	}
	if r.Latency != nil {
		fmt.Fprintf(&b, "  p50 %v p99 %v", lat(r.Latency.P50), lat(r.Latency.P99))
	}
	if r.CPU > 0 {
		fmt.Fprintf(&b, "  proxy CPU %v = %v/%s", r.CPU.Round(time.Millisecond), us(r.CPUPerOp), r.Unit)
		if r.SysCPU > 0 {
			fmt.Fprintf(&b, " (%.0f%% system)", 100*float64(r.SysCPU)/float64(r.CPU))
		}
	}
	if r.RSSDuring > 0 {
		fmt.Fprintf(&b, "  RSS %.1f → %.1f MiB = %.1f KiB/session", mib(r.RSSBefore), mib(r.RSSDuring), kib(r.RSSPerSession))
	}
	if r.Errors > 0 {
		fmt.Fprintf(&b, "  ERRORS %d (first: %s)", r.Errors, r.FirstError)
	}
	if r.TLS != "" {
		fmt.Fprintf(&b, "  [%s]", r.TLS)
	}
	return b.String()
}

func us(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d < 10*time.Microsecond:
		return fmt.Sprintf("%.1f µs", float64(d)/1e3)
	case d < 100*time.Millisecond:
		// CPU per operation stays in one unit across the table.
		return fmt.Sprintf("%.0f µs", float64(d)/1e3)
	}
	return fmt.Sprintf("%.1f ms", float64(d)/1e6)
}

// lat formats a latency: µs below 10 ms, ms above.
func lat(d time.Duration) string {
	if d < 10*time.Millisecond {
		return us(d)
	}
	return fmt.Sprintf("%.1f ms", float64(d)/1e6)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
func kib(b int64) float64 { return float64(b) / (1 << 10) }

// Machine describes where a report was measured.
type Machine struct {
	CPUs     int
	CPUModel string
	Kernel   string
	Go       string
	HAProxy  string
	OpenSSL  string
	Dovecot  string
	Commit   string
	Date     time.Time
}

// ThisMachine gathers Machine from this host; haproxy and dovecot are the
// binaries' paths.
func ThisMachine(haproxy, dovecot string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), Date: time.Now().UTC()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	m.Kernel = firstLine(exec.Command("uname", "-sr"))
	m.HAProxy = firstLine(exec.Command(haproxy, "-v"))
	for line := range strings.SplitSeq(output(exec.Command(haproxy, "-vv")), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Running on OpenSSL version :"); ok {
			m.OpenSSL = strings.TrimSpace(v)
		}
	}
	m.Dovecot = firstLine(exec.Command(dovecot, "--version"))
	m.Commit = firstLine(exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12"))
	return m
}

func output(c *exec.Cmd) string {
	b, _ := c.CombinedOutput()
	return string(b)
}

func firstLine(c *exec.Cmd) string {
	s, _, _ := strings.Cut(output(c), "\n")
	return strings.TrimSpace(s)
}

// Report is a full side-by-side run.
type Report struct {
	Machine  Machine
	Commands []string // how to rerun it
	Setup    []string // what each target was, one line each
	Targets  []string // column order
	Results  []Result
	Notes    []string
}

func (rep *Report) get(scenario, target string) (Result, bool) {
	for _, r := range rep.Results {
		if r.Scenario == scenario && r.Target == target {
			return r, true
		}
	}
	return Result{}, false
}

// Markdown renders the report: machine, commands, one table with a column
// per target, and the targets of issue 2 with whether imapgate met them.
func (rep *Report) Markdown() string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	m := rep.Machine
	w("Measured %s at commit `%s`.", m.Date.Format("2006-01-02 15:04 MST"), m.Commit)
	w("")
	w("| machine | |")
	w("| --- | --- |")
	w("| CPUs (nproc) | %d × %s |", m.CPUs, m.CPUModel)
	w("| kernel | %s |", m.Kernel)
	w("| Go | %s |", m.Go)
	w("| HAProxy | %s (OpenSSL %s) |", m.HAProxy, m.OpenSSL)
	w("| Dovecot | %s |", m.Dovecot)
	w("")
	if len(rep.Setup) > 0 {
		for _, s := range rep.Setup {
			w("- %s", s)
		}
		w("")
	}
	w("Commands:")
	w("")
	w("```sh")
	for _, c := range rep.Commands {
		w("%s", c)
	}
	w("```")
	w("")

	hdr := "| | " + strings.Join(rep.Targets, " | ") + " |"
	w("%s", hdr)
	w("|%s", strings.Repeat(" --- |", len(rep.Targets)+1))
	row := func(name string, scenario string, cell func(Result) string) {
		var cells []string
		seen := false
		for _, t := range rep.Targets {
			r, ok := rep.get(scenario, t)
			c := "–"
			if ok {
				if s := cell(r); s != "" {
					c, seen = s, true
				}
			}
			cells = append(cells, c)
		}
		if seen {
			w("| %s | %s |", name, strings.Join(cells, " | "))
		}
	}
	cpu := func(r Result) string {
		if r.CPU == 0 && r.CPUPerOp == 0 {
			return ""
		}
		return us(r.CPUPerOp)
	}
	rounds := func(r Result) string { return joinDurations(r.RoundCPUPerOp) }
	for _, sc := range rep.scenarios("login") {
		row(sc+": logins/s", sc, func(r Result) string { return fmt.Sprintf("%.0f", r.Rate) })
		row(sc+": **proxy CPU per login**", sc, cpu)
		row(sc+": proxy CPU per login, by round", sc, rounds)
		row(sc+": of which system (kernel)", sc, func(r Result) string {
			if r.SysCPU == 0 || r.Amount == 0 {
				return ""
			}
			return us(time.Duration(float64(r.SysCPU) / r.Amount))
		})
		row(sc+": login cycle p50 / p99", sc, latency)
		row(sc+": TLS", sc, func(r Result) string { return r.TLS })
		row(sc+": errors", sc, errCell)
	}
	for _, sc := range []string{"fetch-big", "fetch-small"} {
		row(sc+": MiB/s", sc, func(r Result) string { return fmt.Sprintf("%.0f", r.Rate) })
		row(sc+": **proxy CPU per MiB**", sc, cpu)
		row(sc+": proxy CPU per MiB, by round", sc, rounds)
		row(sc+": errors", sc, errCell)
	}
	row("noop: **p50** / p99 round trip", "noop", latency)
	row("noop: round trips/s", "noop", func(r Result) string { return fmt.Sprintf("%.0f", r.Rate) })
	row("noop: proxy CPU per round trip", "noop", cpu)
	row("noop: proxy CPU per round trip, by round", "noop", rounds)
	row("noop: p50 by round", "noop", func(r Result) string { return joinDurations(r.RoundP50) })
	for _, sc := range rep.scenarios("idle") {
		row(sc+": sessions open / alive after hold", sc, func(r Result) string {
			return fmt.Sprintf("%d / %d", r.Open, r.Alive)
		})
		row(sc+": proxy RSS before → during", sc, func(r Result) string {
			if r.RSSDuring == 0 {
				return ""
			}
			return fmt.Sprintf("%.1f → %.1f MiB", mib(r.RSSBefore), mib(r.RSSDuring))
		})
		row(sc+": **proxy RSS per idle session**", sc, func(r Result) string {
			if r.RSSDuring == 0 {
				return ""
			}
			return fmt.Sprintf("%.1f KiB", kib(r.RSSPerSession))
		})
		row(sc+": proxy CPU per session opened", sc, cpu)
		row(sc+": errors", sc, errCell)
	}
	w("")
	if v := rep.verdicts(); len(v) > 0 {
		w("Targets of issue 13 (imapgate against HAProxy and nginx in the same run):")
		w("")
		w("| target | measured | met |")
		w("| --- | --- | --- |")
		for _, l := range v {
			w("%s", l)
		}
		w("")
	}
	for _, n := range rep.Notes {
		w("%s", n)
		w("")
	}
	return b.String()
}

// scenarios lists the result scenarios that start with prefix, in order.
func (rep *Report) scenarios(prefix string) []string {
	var out []string
	for _, r := range rep.Results {
		if strings.HasPrefix(r.Scenario, prefix) && !contains(out, r.Scenario) {
			out = append(out, r.Scenario)
		}
	}
	return out
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func latency(r Result) string {
	if r.Latency == nil {
		return ""
	}
	return lat(r.Latency.P50) + " / " + lat(r.Latency.P99)
}

func errCell(r Result) string {
	if r.Errors == 0 {
		return "0"
	}
	return fmt.Sprintf("%d (%s)", r.Errors, r.FirstError)
}

// joinDurations is a cell of per-round figures, "" for fewer than two.
func joinDurations(ds []time.Duration) string {
	if len(ds) < 2 {
		return ""
	}
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = us(d)
	}
	return strings.Join(parts, " / ")
}

// roundRange is the lowest and highest of f(a[i], b[i]): what each round
// of a run gives on its own (round i of every target ran back to back).
// ok is false unless both have the same number of rounds, at least two,
// and f accepts every pair.
func roundRange(a, b []time.Duration, f func(x, y time.Duration) (float64, bool)) (lo, hi float64, ok bool) {
	if len(a) < 2 || len(a) != len(b) {
		return 0, 0, false
	}
	lo, hi = math.Inf(1), math.Inf(-1)
	for i := range a {
		v, ok := f(a[i], b[i])
		if !ok {
			return 0, 0, false
		}
		lo, hi = min(lo, v), max(hi, v)
	}
	return lo, hi, true
}

// ratioOf and microsOver are roundRange's two measures: a ratio, and a
// difference in µs.
func ratioOf(x, y time.Duration) (float64, bool)    { return float64(x) / float64(y), y > 0 }
func microsOver(x, y time.Duration) (float64, bool) { return float64(x-y) / 1e3, true }

// verdicts compares imapgate with HAProxy and nginx against issue 13's
// targets.
func (rep *Report) verdicts() []string {
	const ig, hp, ng = "imapgate", "haproxy", "nginx"
	var out []string
	yes := func(ok bool) string {
		if ok {
			return "yes"
		}
		return "**no**"
	}
	ratio := func(name, scenario, unit string, limit float64) {
		a, ok1 := rep.get(scenario, ig)
		h, ok2 := rep.get(scenario, hp)
		if !ok1 || !ok2 || h.CPUPerOp == 0 {
			return
		}
		x := float64(a.CPUPerOp) / float64(h.CPUPerOp)
		measured := fmt.Sprintf("%v vs %v per %s = %.2f×", us(a.CPUPerOp), us(h.CPUPerOp), unit, x)
		met := yes(x <= limit)
		if lo, hi, ok := roundRange(a.RoundCPUPerOp, h.RoundCPUPerOp, ratioOf); ok {
			measured += fmt.Sprintf("; by round %.2f-%.2f×", lo, hi)
			if lo <= limit && limit < hi {
				met += " (the rounds straddle the limit)"
			}
		}
		out = append(out, fmt.Sprintf("| %s ≤ %.1f× HAProxy's | %s | %s |", name, limit, measured, met))
	}
	ratio("CPU per login (login, Go's default key exchange)", "login", "login", 1.0)
	ratio("CPU per login (login (X25519 only))", "login (X25519 only)", "login", 0.9)
	if f, ok := rep.get("login", ig); ok && f.CPUPerOp > 0 {
		if r, ok := rep.get("login (resumed)", ig); ok {
			x := float64(r.CPUPerOp) / float64(f.CPUPerOp)
			out = append(out, fmt.Sprintf("| CPU per login, resumed ≤ 0.6× full handshake (imapgate) | %v vs %v = %.2f× | %s |", us(r.CPUPerOp), us(f.CPUPerOp), x, yes(x <= 0.6)))
		}
	}
	ratio("CPU per MiB (10 MiB message)", "fetch-big", "MiB", 0.8)
	ratio("CPU per MiB (small messages)", "fetch-small", "MiB", 0.8)
	if a, ok := rep.get("noop", ig); ok && a.Latency != nil {
		if n, ok := rep.get("noop", ng); ok && n.Latency != nil {
			d := a.Latency.P50 - n.Latency.P50
			measured := fmt.Sprintf("%v vs %v (%+.1f µs)", us(a.Latency.P50), us(n.Latency.P50), float64(d)/1e3)
			met := yes(d <= 0)
			if lo, hi, ok := roundRange(a.RoundP50, n.RoundP50, microsOver); ok {
				measured += fmt.Sprintf("; by round %+.1f to %+.1f µs", lo, hi)
				if lo <= 0 && hi > 0 {
					met += " (the rounds straddle the limit)"
				}
			}
			out = append(out, fmt.Sprintf("| NOOP p50 ≤ nginx's | %s | %s |", measured, met))
		}
	}
	ratio("CPU per NOOP round trip", "noop", "round trip", 1.0)
	for _, sc := range rep.scenarios("idle") {
		if a, ok := rep.get(sc, ig); ok && a.RSSDuring > 0 {
			h, _ := rep.get(sc, hp)
			out = append(out, fmt.Sprintf("| RSS per idle TLS session (%s) ≤ 9 KiB at %d sessions | %.1f KiB (HAProxy %.1f KiB) | %s |", sc, a.Open, kib(a.RSSPerSession), kib(h.RSSPerSession), yes(a.RSSPerSession <= 9<<10 && a.Open >= 9000)))
		}
	}
	return out
}

// Markers delimit the generated part of BENCHMARKS.md; the rest of the
// file is prose kept by hand.
const (
	BeginMarker = "<!-- BEGIN GENERATED by make bench: do not edit by hand -->"
	EndMarker   = "<!-- END GENERATED -->"
)

// UpdateFile replaces the generated part of path with body, or appends it
// when the file has no markers (or does not exist).
func UpdateFile(path, body string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	gen := BeginMarker + "\n\n" + strings.TrimSpace(body) + "\n\n" + EndMarker
	s := string(old)
	i := strings.Index(s, BeginMarker)
	j := strings.Index(s, EndMarker)
	switch {
	case i >= 0 && j > i:
		s = s[:i] + gen + s[j+len(EndMarker):]
	case s == "":
		s = "# Benchmarks\n\n" + gen + "\n"
	default:
		s = strings.TrimRight(s, "\n") + "\n\n" + gen + "\n"
	}
	return os.WriteFile(path, []byte(s), 0o644)
}
