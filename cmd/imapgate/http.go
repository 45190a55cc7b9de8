package main

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// handler serves /healthz (the process is alive), /readyz (it wants
// traffic: listeners up, router usable, not draining), /metrics and the
// admin API under /admin/ (admin.go), and the status page at / (status.go).
func (a *app) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if a.draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		if !a.isReady() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte(a.readyText())) // degraded.go
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	a.adminRoutes(mux)
	a.statusRoutes(mux)
	return mux
}
