package main

import (
	"context"
	"fmt"
	"reflect"

	"github.com/imapgate/imapgate/internal/adminapi"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/proxy"
	"github.com/imapgate/imapgate/routing"
	igtls "github.com/imapgate/imapgate/tls"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// reload re-reads the configuration file (when started with -config) and
// the certificates, applies what can change live and reports the rest. A
// file that does not parse or validate, or a new [tls] section whose
// certificates cannot be loaded, is refused as a whole: the running
// configuration stays, and so do the sessions.
func (a *app) Reload(ctx context.Context) adminapi.ReloadReport {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	rep := a.doReload(ctx)
	a.metrics.Reloaded(rep.Result)
	switch {
	case rep.Result != adminapi.Applied:
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

func (a *app) doReload(ctx context.Context) adminapi.ReloadReport {
	rep := adminapi.ReloadReport{Result: adminapi.Refused, Applied: []string{}, Restart: []string{}}
	old := a.cfg.Load()
	if a.flags == nil || a.flags.config == "" {
		// Flags or the demo: nothing to re-read but the certificates.
		if err := a.tlsMgr.Load().Reload(); err != nil {
			rep.Error = "certificates: " + err.Error()
			return rep
		}
		rep.Result, rep.Certificates = adminapi.Applied, "reloaded"
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
	rep.Result = adminapi.Applied
	return rep
}

// tableRouter is a router whose table a reload replaces (routing.Table).
type tableRouter interface {
	SetConfig(ctx context.Context, cfg routing.StaticConfig) (evicted int, err error)
}

// checkInForce validates eff, the configuration a reload would put in
// force, as a whole (keys that need a restart keep their start-up values
// in it) and against the admin listener actually bound: a reload cannot
// leave a non-loopback admin API without a token.
func (a *app) checkInForce(eff *config.Config) error {
	if err := eff.Validate(); err != nil {
		return fmt.Errorf("the configuration in force after this reload would be invalid: %w", err)
	}
	if a.httpAddr != nil {
		if err := config.CheckAdminExposure(a.httpAddr.String(), eff.HTTP.AdminToken); err != nil {
			return fmt.Errorf("refused: the admin API stays bound to %s until a restart: %w", a.httpAddr, err)
		}
	}
	return nil
}
