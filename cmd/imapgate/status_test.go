package main

import (
	"context"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/imapgate/imapgate/internal/testenv"
)

func TestStatusPageAuthAndContent(t *testing.T) {
	ta := startTestApp(t)
	_, home := ta.home(t, "alice@example.org")
	get := func(path string, hdr map[string]string, basic string) (int, http.Header, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", ta.admin+path, nil)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		if basic != "" {
			req.SetBasicAuth("admin", basic)
		}
		resp, err := opsHTTP.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		buf := make([]byte, 32<<10)
		for {
			n, err := resp.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return resp.StatusCode, resp.Header, b.String()
	}
	bearer := map[string]string{"Authorization": "Bearer " + testToken}
	if code, h, _ := get("/", nil, ""); code != 401 || !strings.HasPrefix(h.Get("WWW-Authenticate"), "Basic ") {
		t.Errorf("no token: %d %q, want 401 with a Basic challenge (browsers prompt)", code, h.Get("WWW-Authenticate"))
	}
	if code, _, _ := get("/", nil, "wrong"); code != 401 {
		t.Errorf("wrong token: %d", code)
	}
	if code, _, _ := get("/", map[string]string{"Authorization": "Bearer " + testToken, "Origin": "https://evil.example"}, ""); code != 403 {
		t.Errorf("cross-origin: %d, want 403", code)
	}
	code, h, body := get("/", nil, testToken)
	if code != 200 || !strings.HasPrefix(h.Get("Content-Type"), "text/html") || !strings.Contains(h.Get("Content-Security-Policy"), "default-src 'none'") {
		t.Fatalf("Basic with the token: %d %v", code, h)
	}
	for _, want := range []string{"<td>b1</td>", "<td>b2</td>", `id="sessions">1<`, currentVersion().Version, "127.0.0.1:", "starttls"} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Count(body, "<script") != 1 || !strings.Contains(body, `<script nonce="`) || strings.Contains(body, "http://") || strings.Contains(body, "https://") {
		t.Errorf("the page has a script other than its own, or an external reference")
	}
	if csp := h.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'nonce-") || strings.Contains(csp, "unsafe-eval") || strings.Contains(csp, "script-src 'unsafe-inline'") {
		t.Errorf("CSP %q", csp)
	}
	_, _, body = get("/?user="+url.QueryEscape("Alice@Example.org"), bearer, "")
	if !strings.Contains(body, `id="where-next">`+home+`<`) || !strings.Contains(body, "1 live session here") {
		t.Errorf("user search: %s", body[strings.Index(body, "<h2>Find"):min(len(body), strings.Index(body, "<h2>Find")+1500)])
	}
	// The user's input comes back escaped.
	_, _, body = get("/?user="+url.QueryEscape(`<b>x</b>"`), bearer, "")
	if strings.Contains(body, "<b>x</b>") {
		t.Errorf("the search box reflects HTML unescaped")
	}
	if code, _, _ := get("/nope", bearer, ""); code != 404 {
		t.Errorf("GET /nope: %d, want 404 (only / is the page)", code)
	}
}

// TestStatusPageChromium opens the page in a real headless Chromium: it
// loads without console errors, shows the running instance's backends,
// and the user search finds a logged-in user. The screenshot is kept in
// $IMAPGATE_ARTIFACTS (default: a directory under the system temp dir).
func TestStatusPageChromium(t *testing.T) {
	testenv.Need(t, "chromium")
	ta := startTestApp(t)
	_, home := ta.home(t, "alice@example.org")
	ta.home(t, "bob@example.org")

	profile, err := os.MkdirTemp("", "imapgate-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(profile) })
	actx, cancelA := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(testenv.Bin("chromium")),
		chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.UserDataDir(profile),
		chromedp.WindowSize(1280, 900),
	)
	t.Cleanup(cancelA)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, cancelT := context.WithTimeout(ctx, 60*time.Second)
	t.Cleanup(cancelT)

	var mu sync.Mutex
	var problems []string
	err = chromedp.Listen(ctx, func(ev any) {
		mu.Lock()
		defer mu.Unlock()
		switch e := ev.(type) {
		case *runtime.EventConsoleAPICalled:
			if e.Type == runtime.ConsoleAPICalledTypeError || e.Type == runtime.ConsoleAPICalledTypeWarning || e.Type == runtime.ConsoleAPICalledTypeAssert {
				problems = append(problems, "console."+string(e.Type))
			}
		case *runtime.EventExceptionThrown:
			problems = append(problems, "exception: "+e.ExceptionDetails.Text)
		case *log.EventEntryAdded:
			if e.Entry.Level == log.EntryLevelError || e.Entry.Level == log.EntryLevelWarning {
				problems = append(problems, string(e.Entry.Source)+": "+e.Entry.Text)
			}
		}
	})
	if err != nil {
		t.Fatalf("chromium: %v", err)
	}
	run := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(ctx, steps...); err != nil {
			t.Fatalf("chromium: %s: %v", what, err)
		}
	}
	text := func(id string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.ID(id)))
		if err != nil {
			t.Fatalf("chromium: text of #%s: %v", id, err)
		}
		return s
	}
	if _, err := chromedp.Call(ctx, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Authorization": "Bearer " + testToken}}); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	run("open the page", chromedp.Navigate(ta.admin+"/"), chromedp.WaitVisible(chromedp.ID("backends")))
	backends := text("backends")
	// The page's own script ran (its CSP nonce let it): the reload timer is set.
	if typ, err := chromedp.Run(ctx, chromedp.Evaluate[string](`typeof reload`)); err != nil || typ != "number" {
		t.Errorf("the page's script did not run: typeof reload = %q, %v", typ, err)
	}
	// The search is a plain form: submitting it loads the page again.
	if _, err := chromedp.Run(ctx, chromedp.WaitEvent(page.LoadEventFired, nil,
		chromedp.Steps(chromedp.SendKeys(chromedp.ID("user"), "alice@example.org"), chromedp.Click(chromedp.ID("find"))))); err != nil {
		t.Fatalf("chromium: search: %v", err)
	}
	run("search result", chromedp.WaitVisible(chromedp.ID("where-sessions")))
	where, next := text("where"), text("where-next")
	shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("chromium: screenshot: %v", err)
	}
	for _, id := range []string{"b1", "b2"} {
		if !strings.Contains(backends, id) {
			t.Errorf("backends table %q lacks %s", backends, id)
		}
	}
	if !strings.Contains(where, "alice@example.org") || next != home || !strings.Contains(where, "spliced") {
		t.Errorf("user search: next %q, where %q", next, where)
	}
	// Events may trail the last action by a moment; they are in once the
	// page has been asked something after them.
	if title, err := chromedp.Run(ctx, chromedp.Title()); err != nil || title != "imapgate status" {
		t.Errorf("title %q, %v", title, err)
	}
	mu.Lock()
	if len(problems) > 0 {
		t.Errorf("console errors or warnings: %q", problems)
	}
	mu.Unlock()

	dir := os.Getenv("IMAPGATE_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "imapgate-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "status-page.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes)", path, len(shot))
}
