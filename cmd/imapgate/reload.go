package main

import (
	"context"
	"fmt"
	"github.com/imapgate/imapgate/proxy"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// reloadReport says what a reload did, for the log and the admin API.
type reloadReport struct {
	// Result is "applied" or "refused".
	Result string `json:"result"`
	// Error is why the new configuration was refused.
	Error string `json:"error,omitempty"`
	// Applied are the changed keys now in force.
	Applied []string `json:"applied"`
	// Restart are keys that differ from what the process started with and
	// that only a restart applies; their old values stay in force.
	Restart []string `json:"restart"`
	// Ignored are changed keys the running router does not use.
	Ignored []string `json:"ignored,omitempty"`
	// Certificates is "reloaded" (files re-read) or "replaced" (a new
	// [tls] section is in force).
	Certificates string `json:"certificates"`
	// Evicted counts sessions closed because their user now routes to
	// another backend.
	Evicted int `json:"evicted"`
}

// reload re-reads the configuration file (when started with -config) and
// the certificates, applies what can change live and reports the rest. A
// file that does not parse or validate, or a new [tls] section whose
// certificates cannot be loaded, is refused as a whole: the running
// configuration stays, and so do the sessions.
func (a *app) reload(ctx context.Context) reloadReport {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	rep := a.doReload(ctx)
	a.metrics.reload(rep.Result)
	switch {
	case rep.Result != "applied":
		a.log.Error("reload refused, the running configuration stays", zap.String("error", rep.Error))
	default:
		fields := []zap.Field{zap.Strings("applied", rep.Applied), zap.String("certificates", rep.Certificates)}
		if rep.Evicted > 0 {
			fields = append(fields, zap.Int("evicted", rep.Evicted))
		}
		if len(rep.Ignored) > 0 {
			fields = append(fields, zap.Strings("ignored", rep.Ignored))
		}
		a.log.Info("reload applied", fields...)
		if len(rep.Restart) > 0 {
			a.log.Warn("reload: these changes need a restart; the old values stay in force", zap.Strings("keys", rep.Restart))
		}
	}
	return rep
}

func (a *app) doReload(ctx context.Context) reloadReport {
	rep := reloadReport{Result: "refused", Applied: []string{}, Restart: []string{}}
	old := a.cfg.Load()
	if a.flags == nil || a.flags.config == "" {
		// Flags or the demo: nothing to re-read but the certificates.
		if err := a.tlsMgr.Load().Reload(); err != nil {
			rep.Error = "certificates: " + err.Error()
			return rep
		}
		rep.Result, rep.Certificates = "applied", "reloaded"
		return rep
	}
	next, _, err := a.flags.load()
	if err != nil {
		rep.Error = err.Error()
		return rep
	}
	consul := a.kind == "consul" || a.directory() != nil // routers whose tables come from outside the file
	acme := usesACME(old) || usesACME(next)
	for _, k := range diffKeys(old, next) {
		switch reloadClass(k, consul, acme) {
		case classLive:
			rep.Applied = append(rep.Applied, k)
		case classIgnored:
			rep.Ignored = append(rep.Ignored, k)
		}
	}
	for _, k := range diffKeys(a.boot, next) {
		if reloadClass(k, consul, acme) == classRestart {
			rep.Restart = append(rep.Restart, k)
		}
	}
	eff := effective(a.boot, next, consul, acme)
	if err := a.checkInForce(eff); err != nil {
		rep.Error = err.Error()
		return rep
	}

	// Build everything new before swapping anything, so that a failure
	// leaves the old configuration whole.
	var newTLS *igtls.Manager
	if !acme && !reflect.DeepEqual(old.TLS, eff.TLS) {
		if newTLS, err = a.newTLSManager(ctx, eff); err != nil {
			rep.Error = err.Error()
			return rep
		}
	}
	var level zapcore.Level
	lvl, _ := eff.LogLevel() // validated
	if err := level.Set(lvl); err != nil {
		rep.Error = err.Error()
		return rep
	}
	var popts *proxy.Options
	if a.srv != nil {
		o, err := eff.ProxyOptions()
		if err != nil {
			if newTLS != nil {
				newTLS.Close()
			}
			rep.Error = err.Error()
			return rep
		}
		o.Router, o.TLS, o.Logger, o.Metrics = a.popts.Router, a.popts.TLS, a.popts.Logger, a.popts.Metrics
		if o.Limits.MaxConnections == 0 {
			o.Limits.MaxConnections = a.popts.Limits.MaxConnections // derived from the open-file limit
		}
		popts = &o
	}
	// The static table goes last of the steps that can fail: it closes the
	// sessions it now routes elsewhere as it is swapped in.
	if t, ok := a.router.(tableRouter); ok && !consul {
		sc, err := eff.StaticConfig()
		if err == nil {
			rep.Evicted, err = t.SetConfig(ctx, sc)
		}
		if err != nil {
			if newTLS != nil {
				newTLS.Close()
			}
			rep.Error = "routing: " + err.Error()
			return rep
		}
	}

	// Swap.
	if newTLS != nil {
		prev := a.tlsMgr.Load()
		a.setTLS(newTLS)
		prev.Close()
		rep.Certificates = "replaced"
	} else if err := a.tlsMgr.Load().Reload(); err != nil {
		// The configuration is fine; only a certificate file is not. The
		// manager keeps serving the certificates it had.
		a.log.Error("reload: certificates not reloaded, keeping the old ones", zap.Error(err))
		rep.Certificates = "kept: " + err.Error()
	} else {
		rep.Certificates = "reloaded"
	}
	if a.level != nil {
		a.level.SetLevel(level)
	}
	if popts != nil {
		// Validated by config.Validate through the same checks.
		if err := a.srv.SetOptions(*popts); err != nil {
			a.log.Error("reload: proxy options refused, keeping the old ones", zap.Error(err))
		} else {
			a.popts = *popts
		}
	}
	a.cfg.Store(eff)
	rep.Result = "applied"
	return rep
}

// tableRouter is a router whose table a reload replaces (routing.Table).
type tableRouter interface {
	SetConfig(ctx context.Context, cfg routing.StaticConfig) (evicted int, err error)
}

func usesACME(c *config.Config) bool {
	return len(c.TLS.ACME.Names) > 0 || len(c.TLS.ACME.OnDemandAllow) > 0
}

type keyClass uint8

const (
	classLive keyClass = iota
	classRestart
	classIgnored
)

// reloadClass says whether a changed key applies live. The listeners are
// bound once, the Consul router takes its [consul] section once, and ACME
// its listeners once; the rest (proxy options through SetOptions, the
// static router's tables, certificates, log level) is swapped in.
func reloadClass(key string, consul, acme bool) keyClass {
	under := func(prefixes ...string) bool {
		for _, p := range prefixes {
			if key == p || strings.HasPrefix(key, p+".") || strings.HasPrefix(key, p+"[") {
				return true
			}
		}
		return false
	}
	switch {
	case under("log.format", "listen", "consul", "http.addr", "tls.acme", "tls.session_tickets", "routing.router", "routing.http", "routing.ldap", "routing.directory", "lmtp"):
		return classRestart
	case acme && under("tls"):
		return classRestart
	case consul && under("backend"):
		// The Consul router holds [backend]'s TLS template.
		return classRestart
	case consul && under("backends", "routing"):
		return classIgnored
	}
	return classLive
}

// effective is next with the keys that need a restart kept as they were
// at start-up: the configuration actually in force.
func effective(boot, next *config.Config, consul, acme bool) *config.Config {
	e := *next
	e.Log.Format = boot.Log.Format
	e.Listen = boot.Listen
	e.Consul = boot.Consul
	e.HTTP.Addr = boot.HTTP.Addr
	e.TLS.ACME = boot.TLS.ACME
	e.TLS.SessionTickets = boot.TLS.SessionTickets
	e.Routing.Router = boot.Routing.Router
	e.LMTP = boot.LMTP // the LMTP front end is built once
	if acme {
		e.TLS = boot.TLS
	}
	if consul {
		e.Backend = boot.Backend
	}
	return &e
}

// diffKeys returns the dotted keys (as written in the file) whose values
// differ between a and b, sorted. Values never appear: some are secrets.
func diffKeys(a, b *config.Config) []string {
	fa, fb := map[string]string{}, map[string]string{}
	flatten(fa, "", reflect.ValueOf(*a))
	flatten(fb, "", reflect.ValueOf(*b))
	var out []string
	for k, v := range fa {
		if w, ok := fb[k]; !ok || w != v {
			out = append(out, k)
		}
	}
	for k := range fb {
		if _, ok := fa[k]; !ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

var durationType = reflect.TypeFor[config.Duration]()

// flatten records every leaf of v under its TOML key path.
func flatten(out map[string]string, path string, v reflect.Value) {
	join := func(k string) string {
		if path == "" {
			return k
		}
		return path + "." + k
	}
	switch {
	case v.Kind() == reflect.Pointer:
		if !v.IsNil() {
			flatten(out, path, v.Elem())
		}
	case v.Type() == durationType:
		out[path] = time.Duration(v.Int()).String()
	case v.Kind() == reflect.Struct:
		t := v.Type()
		for i := range t.NumField() {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			flatten(out, join(name), v.Field(i))
		}
	case v.Kind() == reflect.Map:
		for _, k := range slices.Sorted(func(yield func(string) bool) {
			for _, k := range v.MapKeys() {
				if !yield(k.String()) {
					return
				}
			}
		}) {
			flatten(out, join(tomlKey(k)), v.MapIndex(reflect.ValueOf(k)))
		}
	case v.Kind() == reflect.Slice && v.Type().Elem().Kind() == reflect.Struct:
		for i := range v.Len() {
			flatten(out, fmt.Sprintf("%s[%d]", path, i), v.Index(i))
		}
	default:
		out[path] = fmt.Sprintf("%v", v.Interface())
	}
}

// tomlKey quotes a key that is not a bare TOML key.
func tomlKey(k string) string {
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return strconv.Quote(k)
		}
	}
	if k == "" {
		return `""`
	}
	return k
}
