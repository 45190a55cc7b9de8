package main

import (
	"context"
	"reflect"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
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
	plan := config.PlanReload(a.boot, old, next)
	rep.Applied, rep.Restart, rep.Ignored = plan.Applied, plan.Restart, plan.Ignored
	eff := plan.InForce
	if err := a.checkInForce(eff); err != nil {
		rep.Error = err.Error()
		return rep
	}

	// Build everything new before swapping anything, so that a failure
	// leaves the old configuration whole.
	var newTLS *igtls.Manager
	// With ACME in use [tls] is restart-only, so eff.TLS is old.TLS.
	if !reflect.DeepEqual(old.TLS, eff.TLS) {
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
	if t, ok := a.router.(tableRouter); ok {
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
