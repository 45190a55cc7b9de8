// Package ctl is `imapgate ctl`: the operator's client of a running
// imapgate's admin API (internal/admin), printing tables for people and,
// with -json, the API's own JSON (internal/adminapi) for scripts.
//
// Typical use, from the binary:
//
//	os.Exit(ctl.Main(os.Args[2:], os.Stdout, os.Stderr))
//
// Exit status: 0 done, 1 the API or the network said no, 2 usage.
package ctl

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/imapgate/imapgate/internal/adminapi"
)

const ctlUsage = `Usage: imapgate ctl [flags] COMMAND [ARGS]

Commands (against a running imapgate's admin API):
  sessions [-user U] [-backend B]   list live sessions on that instance
  kick USER                         close USER's sessions on that instance
  backends                          list backends and their state
  drain BACKEND                     place no new users on BACKEND
  undrain BACKEND                   allow new users on BACKEND again
  move USER BACKEND                 pin USER to BACKEND and close their sessions elsewhere
  where USER                        where USER lives and why, and their sessions on that instance
  announce USER                     after a hand-made consul kv put/delete of USER (users_watch = "feed")
  reload                            reload the configuration, as SIGHUP does

Flags (before or after the command):
`

// client talks to one imapgate's admin API.
type client struct {
	addr, token string
	json        bool
	http        *http.Client
	stdout      io.Writer
}

// Main runs one operator command (args as after "imapgate ctl") against a
// running imapgate's admin API and returns the exit status.
func Main(args []string, stdout, stderr io.Writer) int {
	c := &client{stdout: stdout, http: &http.Client{Timeout: 2 * adminapi.Timeout}}
	var user, backend string
	newFlags := func(name string) *flag.FlagSet {
		fs := flag.NewFlagSet(name, flag.ContinueOnError)
		fs.SetOutput(stderr)
		addr := os.Getenv("IMAPGATE_ADMIN_ADDR")
		if addr == "" {
			addr = "127.0.0.1:8080"
		}
		fs.StringVar(&c.addr, "addr", addr, "admin API `address` (host:port or URL; $IMAPGATE_ADMIN_ADDR)")
		fs.StringVar(&c.token, "token", os.Getenv("IMAPGATE_ADMIN_TOKEN"), "admin `token` ($IMAPGATE_ADMIN_TOKEN)")
		fs.BoolVar(&c.json, "json", false, "print JSON instead of tables")
		if name == "sessions" {
			fs.StringVar(&user, "user", "", "only this `user`'s sessions")
			fs.StringVar(&backend, "backend", "", "only sessions on this backend `ID`")
		}
		fs.Usage = func() {
			fmt.Fprint(stderr, ctlUsage)
			fs.PrintDefaults()
		}
		return fs
	}
	fs := newFlags("ctl")
	if err := fs.Parse(args); err != nil {
		return usageExit(err)
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	cmd := fs.Arg(0)
	// The command's own flags may follow it; the global ones parsed above
	// are the defaults.
	addr, token, js := c.addr, c.token, c.json
	sub := newFlags(cmd)
	c.addr, c.token, c.json = addr, token, js
	if err := sub.Parse(fs.Args()[1:]); err != nil {
		return usageExit(err)
	}
	rest := sub.Args()
	want := map[string]int{"sessions": 0, "kick": 1, "backends": 0, "drain": 1, "undrain": 1, "move": 2, "reload": 0, "where": 1, "announce": 1}
	n, ok := want[cmd]
	if !ok {
		fmt.Fprintf(stderr, "imapgate ctl: unknown command %q\n", cmd)
		fs.Usage()
		return 2
	}
	if len(rest) != n {
		fmt.Fprintf(stderr, "imapgate ctl %s: want %d argument(s), got %d\n", cmd, n, len(rest))
		return 2
	}
	ctx := context.Background()
	var err error
	switch cmd {
	case "sessions":
		err = c.sessions(ctx, user, backend)
	case "kick":
		err = c.kick(ctx, rest[0])
	case "backends":
		err = c.backends(ctx)
	case "drain", "undrain":
		err = c.drain(ctx, cmd, rest[0])
	case "move":
		err = c.move(ctx, rest[0], rest[1])
	case "reload":
		err = c.reload(ctx)
	case "where":
		err = c.where(ctx, rest[0])
	case "announce":
		err = c.announce(ctx, rest[0])
	}
	if err != nil {
		fmt.Fprintf(stderr, "imapgate ctl %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

func usageExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

func (c *client) url(path string, q url.Values) string {
	base := c.addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u := strings.TrimRight(base, "/") + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

// do sends a request and returns the response if its status is 2xx; an
// error reply's {"error": ...} becomes the error.
func (c *client) do(ctx context.Context, method, path string, q url.Values, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url(path, q), rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		var e adminapi.Error
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return nil, fmt.Errorf("%s (HTTP %d)", e.Error, resp.StatusCode)
		}
		return nil, fmt.Errorf("HTTP %s: %s", resp.Status, bytes.TrimSpace(b))
	}
	return resp, nil
}

// get decodes a JSON reply into v and, with -json, prints it as it came.
func (c *client) get(ctx context.Context, method, path string, q url.Values, v any) error {
	resp, err := c.do(ctx, method, path, q, nil)
	if err != nil {
		return err
	}
	return c.decode(resp, v)
}

// decode reads a JSON reply into v, or with -json prints it as it came
// (v is then left alone: callers print nothing more).
func (c *client) decode(resp *http.Response, v any) error {
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if c.json {
		c.stdout.Write(b)
		return nil
	}
	return json.Unmarshal(b, v)
}

func (c *client) sessions(ctx context.Context, user, backend string) error {
	q := url.Values{}
	if user != "" {
		q.Set("user", user)
	}
	if backend != "" {
		q.Set("backend", backend)
	}
	var r adminapi.SessionsReply
	if err := c.get(ctx, "GET", "/admin/sessions", q, &r); err != nil || c.json {
		return err
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tUSER\tBACKEND\tSTATE\tCLIENT\tLISTENER\tAGE\tIN\tOUT")
	for _, s := range r.Sessions {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, dash(s.User), dash(s.Backend), s.State,
			s.Client, s.Listener, age(s), bytesHuman(s.In), bytesHuman(s.Out))
	}
	tw.Flush()
	fmt.Fprintf(c.stdout, "%d %s\n", r.Count, plural(r.Count, "session", "sessions"))
	return nil
}

func age(s adminapi.Session) string {
	d := s.Duration
	switch {
	case d >= time.Hour:
		return d.Round(time.Minute).String()
	case d >= time.Minute:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Millisecond).String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func bytesHuman(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func (c *client) kick(ctx context.Context, user string) error {
	var r adminapi.KickReply
	if err := c.get(ctx, "POST", "/admin/users/"+url.PathEscape(user)+"/kick", nil, &r); err != nil || c.json {
		return err
	}
	fmt.Fprintf(c.stdout, "kicked %s: %d %s closed\n", r.User, r.Closed, plural(r.Closed, "session", "sessions"))
	return nil
}

func (c *client) backends(ctx context.Context) error {
	var r adminapi.BackendsReply
	if err := c.get(ctx, "GET", "/admin/backends", nil, &r); err != nil || c.json {
		return err
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tADDR\tSECURITY\tWEIGHT\tHEALTH\tUP\tDRAIN\tUSERS\tSESSIONS")
	for _, b := range r.Backends {
		users := fmt.Sprint(b.Users)
		if r.Router != "consul" {
			users = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%d\n", b.ID, b.Addr, b.Security, b.Weight, b.Health,
			yesNo(b.Up), yesNo(b.Drain), users, b.Sessions)
	}
	tw.Flush()
	fmt.Fprintf(c.stdout, "router: %s\n", r.Router)
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (c *client) drain(ctx context.Context, cmd, id string) error {
	verb := map[string]string{"drain": "draining", "undrain": "undraining"}[cmd]
	return c.stream(ctx, fmt.Sprintf("%s %s", verb, id), "/admin/backends/"+url.PathEscape(id)+"/"+cmd, nil)
}

func (c *client) move(ctx context.Context, user, backend string) error {
	return c.stream(ctx, fmt.Sprintf("moving %s to %s", user, backend),
		"/admin/users/"+url.PathEscape(user)+"/move", adminapi.MoveRequest{Backend: backend})
}

// stream runs a long operation and prints its progress as it comes:
// "moving alice to dovecot2... pinned; 2 sessions closed; done (1.2s)".
// With -json it prints the final result object alone.
func (c *client) stream(ctx context.Context, what, path string, body any) error {
	start := time.Now()
	if body == nil {
		body = struct{}{}
	}
	if !c.json {
		fmt.Fprintf(c.stdout, "%s... ", what)
	}
	resp, err := c.do(ctx, "POST", path, nil, body)
	if err != nil {
		if !c.json {
			fmt.Fprintln(c.stdout, "failed")
		}
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	first := true
	for sc.Scan() {
		var ev adminapi.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("bad progress line %q: %w", sc.Text(), err)
		}
		if ev.Event == "error" {
			if !c.json {
				fmt.Fprintln(c.stdout, "failed")
			}
			return errors.New(ev.Message)
		}
		if c.json {
			if ev.Event == "done" {
				b, _ := json.MarshalIndent(ev.Result, "", "  ")
				fmt.Fprintf(c.stdout, "%s\n", b)
			}
			continue
		}
		if !first {
			fmt.Fprint(c.stdout, "; ")
		}
		first = false
		if ev.Event == "done" {
			fmt.Fprintf(c.stdout, "done (%v)\n", time.Since(start).Round(time.Millisecond))
			return nil
		}
		fmt.Fprint(c.stdout, ev.Message)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if c.json {
		return nil
	}
	fmt.Fprintln(c.stdout)
	return errors.New("the server ended the stream without saying done")
}

func (c *client) reload(ctx context.Context) error {
	resp, err := c.do(ctx, "POST", "/admin/reload", nil, struct{}{})
	if err != nil {
		// A refused reload is 422 with a report.
		return err
	}
	var rep adminapi.ReloadReport
	if err := c.decode(resp, &rep); err != nil || c.json {
		return err
	}
	fmt.Fprintf(c.stdout, "reload applied; certificates %s\n", rep.Certificates)
	if len(rep.Applied) > 0 {
		fmt.Fprintf(c.stdout, "changed: %s\n", strings.Join(rep.Applied, ", "))
	} else {
		fmt.Fprintln(c.stdout, "no configuration change")
	}
	if len(rep.Restart) > 0 {
		fmt.Fprintf(c.stdout, "need a restart (old values in force): %s\n", strings.Join(rep.Restart, ", "))
	}
	if len(rep.Ignored) > 0 {
		fmt.Fprintf(c.stdout, "ignored by the running router: %s\n", strings.Join(rep.Ignored, ", "))
	}
	if rep.Evicted > 0 {
		fmt.Fprintf(c.stdout, "%d %s closed (their users now route elsewhere)\n", rep.Evicted, plural(rep.Evicted, "session", "sessions"))
	}
	return nil
}

// where prints what GET /admin/users/{user} says, like Director's
// `doveadm director status USER`.
func (c *client) where(ctx context.Context, user string) error {
	var r adminapi.WhereReply
	if err := c.get(ctx, "GET", "/admin/users/"+url.PathEscape(user), nil, &r); err != nil || c.json {
		return err
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	recorded := dash(r.Recorded)
	if r.Pinned {
		recorded += " (pin)"
	}
	fmt.Fprintf(tw, "user:\t%s\n", r.User)
	fmt.Fprintf(tw, "next login goes to:\t%s\n", dash(r.Backend))
	fmt.Fprintf(tw, "recorded:\t%s\n", recorded)
	if r.Unrecorded != "" {
		fmt.Fprintf(tw, "served unrecorded on:\t%s\n", r.Unrecorded)
	}
	fmt.Fprintf(tw, "hashing picks now:\t%s (%s)\n", dash(r.Hash), dash(r.Pool))
	fmt.Fprintf(tw, "why:\t%s\n", r.Reason)
	tw.Flush()
	for _, s := range r.Sessions {
		fmt.Fprintf(c.stdout, "session %s on %s (%s, from %s, %s)\n", s.ID, dash(s.Backend), s.State, s.Client, age(s))
	}
	fmt.Fprintf(c.stdout, "%d %s here\n", len(r.Sessions), plural(len(r.Sessions), "session", "sessions"))
	return nil
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// announce tells the fleet, through the Consul change feed, that USER's
// placement was changed by hand (consul kv put/delete).
func (c *client) announce(ctx context.Context, user string) error {
	var r adminapi.AnnounceReply
	if err := c.get(ctx, "POST", "/admin/users/"+url.PathEscape(user)+"/announce", nil, &r); err != nil || c.json {
		return err
	}
	fmt.Fprintf(c.stdout, "announced %s: every instance re-reads the entry\n", r.User)
	return nil
}
