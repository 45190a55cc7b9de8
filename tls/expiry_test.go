package tls

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestExpiry(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	now := time.Now()
	fresh := ca.writeLeafValid(t, dir, "fresh", now.Add(-time.Hour), now.Add(89*24*time.Hour), "fresh.example.org")
	// 24 h lifetime, 1 h left: less than a sixth.
	old := ca.writeLeafValid(t, dir, "old", now.Add(-23*time.Hour), now.Add(time.Hour), "old.example.org", "*.old.example.org")

	core, logs := observer.New(zap.InfoLevel)
	reg := prometheus.NewRegistry()
	m, err := New(context.Background(), Config{
		Certificates:        []CertFile{fresh, old},
		Registerer:          reg,
		expiryCheckInterval: 20 * time.Millisecond,
	}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	var names []string
	for _, e := range m.Expiry() {
		names = append(names, e.Name)
		if e.Source != SourceFile {
			t.Errorf("%s: source %v", e.Name, e.Source)
		}
	}
	if want := []string{"*.old.example.org", "fresh.example.org", "old.example.org"}; !slices.Equal(names, want) {
		t.Errorf("Expiry names %v, want %v", names, want)
	}

	// Warned at start and again on the next checks; the fresh one never.
	deadline := time.Now().Add(5 * time.Second)
	for logs.FilterMessageSnippet("expires soon").FilterField(zap.String("name", "old.example.org")).Len() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no repeated expiry warning; logs: %v", logs.All())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := logs.FilterField(zap.String("name", "fresh.example.org")).Len(); n != 0 {
		t.Errorf("%d warnings about the fresh certificate", n)
	}

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "imapgate_tls_certificate_expiry_timestamp_seconds" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range mt.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["source"] != "file" {
				t.Errorf("source label %q", labels["source"])
			}
			got[labels["name"]] = mt.GetGauge().GetValue()
		}
	}
	if len(got) != 3 || got["old.example.org"] != float64(now.Add(time.Hour).Unix()) {
		t.Errorf("gauge %v", got)
	}

	m.Close()
	if mfs, _ := reg.Gather(); len(mfs) != 0 {
		t.Errorf("metrics still registered after Close: %d families", len(mfs))
	}
}

func TestExpiringSoon(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	e := CertExpiry{NotBefore: nb, NotAfter: nb.Add(90 * 24 * time.Hour)}
	tests := []struct {
		at   time.Time
		want bool
	}{
		{nb, false},
		{nb.Add(60 * 24 * time.Hour), false}, // renewal window opens, not yet worrying
		{nb.Add(74 * 24 * time.Hour), false},
		{nb.Add(76 * 24 * time.Hour), true}, // less than 15 days left
		{nb.Add(91 * 24 * time.Hour), true}, // expired
	}
	for _, tt := range tests {
		if got := expiringSoon(e, tt.at); got != tt.want {
			t.Errorf("expiringSoon at day %v = %v", tt.at.Sub(nb).Hours()/24, got)
		}
	}
}
