package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/imapgate/imapgate/internal/config"
	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"
)

// The files under deploy/ are checked by parsers here: no Docker engine,
// Kubernetes or Nomad runs in the tests.

const deployDir = "../../deploy"

// yamlDocs parses every document of a YAML file.
func yamlDocs(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var docs []map[string]any
	for {
		var d map[string]any
		err := dec.Decode(&d)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if d != nil {
			docs = append(docs, d)
		}
	}
}

// dig walks nested maps and lists: dig(m, "spec", "template", 0).
func dig(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func TestDeployCompose(t *testing.T) {
	docs := yamlDocs(t, filepath.Join(deployDir, "docker-compose.yml"))
	if len(docs) != 1 {
		t.Fatalf("%d documents", len(docs))
	}
	services, _ := docs[0]["services"].(map[string]any)
	for _, name := range []string{"consul", "dovecot1", "dovecot2", "imapgate1", "imapgate2"} {
		if services[name] == nil {
			t.Errorf("no service %q", name)
		}
	}
	// The YAML merge key (<<: *imapgate) must give imapgate2 the build.
	if dig(services, "imapgate2", "build", "dockerfile") != "deploy/Dockerfile" {
		t.Errorf("imapgate2 does not inherit imapgate1's build: %v", services["imapgate2"])
	}
	for _, v := range dig(services, "consul", "volumes").([]any) {
		src := strings.SplitN(v.(string), ":", 2)[0]
		if _, err := os.Stat(filepath.Join(deployDir, src)); err != nil {
			t.Errorf("consul volume %s: %v", src, err)
		}
	}
	checkTOML(t, filepath.Join(deployDir, "docker/imapgate.toml"))
}

func TestDeployKubernetes(t *testing.T) {
	kinds := map[string]map[string]any{}
	files, _ := filepath.Glob(filepath.Join(deployDir, "kubernetes/*.yaml"))
	if len(files) == 0 {
		t.Fatal("no manifests")
	}
	for _, f := range files {
		for _, d := range yamlDocs(t, f) {
			kind, _ := d["kind"].(string)
			if kind == "" || d["apiVersion"] == nil {
				t.Errorf("%s: a document without kind or apiVersion", f)
			}
			if kind != "Kustomization" {
				if dig(d, "metadata", "name") == nil {
					t.Errorf("%s: %s without a name", f, kind)
				}
			}
			if _, dup := kinds[kind]; !dup {
				kinds[kind] = d
			}
		}
	}
	for _, k := range []string{"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Kustomization"} {
		if kinds[k] == nil {
			t.Errorf("no %s", k)
		}
	}
	dep := kinds["Deployment"]
	c := dig(dep, "spec", "template", "spec", "containers", 0)
	if dig(c, "readinessProbe", "httpGet", "path") != "/readyz" || dig(c, "livenessProbe", "httpGet", "path") != "/healthz" {
		t.Errorf("probes: %v", c)
	}
	if dig(dep, "spec", "template", "spec", "securityContext", "runAsNonRoot") != true {
		t.Error("Deployment does not run as non-root")
	}
	// The grace period covers the drain configured in the ConfigMap.
	text, _ := dig(kinds["ConfigMap"], "data", "imapgate.toml").(string)
	cfg := checkTOMLText(t, "ConfigMap", text)
	need := cfg.Shutdown.DrainWindow.D() + cfg.Shutdown.Grace.D()
	grace, _ := dig(dep, "spec", "template", "spec", "terminationGracePeriodSeconds").(int)
	if float64(grace) <= need.Seconds() {
		t.Errorf("terminationGracePeriodSeconds %d does not cover drain_window + grace = %v", grace, need)
	}
	kust, _ := dig(kinds["Kustomization"], "resources").([]any)
	for _, r := range kust {
		if _, err := os.Stat(filepath.Join(deployDir, "kubernetes", r.(string))); err != nil {
			t.Errorf("kustomization resource: %v", err)
		}
	}
}

// checkTOML parses and validates a configuration file of deploy/.
func checkTOML(t *testing.T, path string) *config.Config {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return checkTOMLText(t, path, string(b))
}

func checkTOMLText(t *testing.T, name, text string) *config.Config {
	t.Helper()
	cfg, err := config.Parse(text)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("%s: %v", name, err)
	}
	return cfg
}

// TestDeployExampleConfigCoversEveryKey: deploy/imapgate.toml parses,
// validates, and sets every key internal/config knows, each with a
// comment above it or beside it.
func TestDeployExampleConfigCoversEveryKey(t *testing.T) {
	path := filepath.Join(deployDir, "imapgate.toml")
	checkTOML(t, path)
	text, _ := os.ReadFile(path)
	var c config.Config
	md, err := toml.Decode(string(text), &c)
	if err != nil {
		t.Fatal(err)
	}
	set := map[string]bool{}
	for _, k := range md.Keys() {
		set[genericKey(k)] = true
	}
	var all []string
	configKeys(&all, "", reflect.TypeFor[config.Config]())
	for _, k := range all {
		if !set[k] && !commentedOut(string(text), k) {
			t.Errorf("deploy/imapgate.toml neither sets %s nor shows it commented out in its table", k)
		}
	}
	// Every key line is explained: a comment on the line or the one above.
	lines := strings.Split(string(text), "\n")
	keyLine := regexp.MustCompile(`^\s*("[^"]*"|[a-z0-9_]+)\s*=`)
	for i, l := range lines {
		if !keyLine.MatchString(l) || strings.Contains(l, "#") {
			continue
		}
		prev := strings.TrimSpace(lines[max(i-1, 0)])
		if !strings.HasPrefix(prev, "#") && !keyLine.MatchString(prev) {
			t.Errorf("line %d %q has no comment", i+1, l)
		}
	}
}

// commentedOut reports whether key appears as "# name = ..." after its
// table's header "# [table]": for tables that turn a feature on by being
// present, such as [backend.master].
func commentedOut(text, key string) bool {
	i := strings.LastIndexByte(key, '.')
	if i < 0 || strings.Contains(key, "*") {
		return false
	}
	table, name := key[:i], key[i+1:]
	_, rest, ok := strings.Cut(text, "# ["+table+"]\n")
	return ok && regexp.MustCompile(`(?m)^# `+regexp.QuoteMeta(name)+` = `).MatchString(rest)
}

// genericKey turns a decoded key into the schema's form: map keys and
// array indices become "*".
func genericKey(k toml.Key) string {
	var out []string
	t := reflect.TypeFor[config.Config]()
	for _, part := range k {
		for t.Kind() == reflect.Slice || t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch t.Kind() {
		case reflect.Map:
			out = append(out, "*")
			t = t.Elem()
		case reflect.Struct:
			f, ok := fieldByTag(t, part)
			if !ok {
				return strings.Join(append(out, part), ".")
			}
			out = append(out, part)
			t = f.Type
		default:
			out = append(out, part)
		}
	}
	return strings.Join(out, ".")
}

func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		if tag, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ","); tag == name {
			return t.Field(i), true
		}
	}
	return reflect.StructField{}, false
}

var durationType = reflect.TypeFor[config.Duration]()

// configKeys lists every leaf key of the schema, maps as "*".
func configKeys(out *[]string, prefix string, t reflect.Type) {
	join := func(k string) string {
		if prefix == "" {
			return k
		}
		return prefix + "." + k
	}
	if t == durationType {
		*out = append(*out, prefix)
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		configKeys(out, prefix, t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			configKeys(out, join(name), t.Field(i).Type)
		}
	case reflect.Map:
		configKeys(out, join("*"), t.Elem())
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Struct {
			configKeys(out, prefix, t.Elem())
			return
		}
		*out = append(*out, prefix)
	default:
		*out = append(*out, prefix)
	}
}

func TestDeployConsulAndGrafana(t *testing.T) {
	for _, f := range []string{"consul/dovecot1.json", "consul/dovecot2.json"} {
		var def struct {
			Service struct {
				ID, Name string
				Port     int
				Meta     map[string]string
				Checks   []struct{ TCP, Interval string }
			}
		}
		b, err := os.ReadFile(filepath.Join(deployDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &def); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		s := def.Service
		if s.Name != "imap" || s.ID == "" || s.Port == 0 || len(s.Checks) == 0 || s.Checks[0].TCP == "" || s.Meta["imapgate-security"] == "" {
			t.Errorf("%s: %+v", f, s)
		}
	}
	b, err := os.ReadFile(filepath.Join(deployDir, "grafana/imapgate.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	// Every metric the dashboard queries exists under that name.
	known := map[string]bool{}
	for _, n := range []string{
		"imapgate_consul_view_age_seconds", "imapgate_consul_watch_errors_total",
		"imapgate_consul_placements_total", "imapgate_consul_evicted_sessions_total",
	} {
		known[n] = true // registered by the Consul router
	}
	ta := startTestApp(t)
	descs := make(chan *prometheus.Desc, 1000)
	for _, c := range ta.metrics.Collectors() {
		c.Describe(descs)
	}
	close(descs)
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	for d := range descs {
		if m := fq.FindStringSubmatch(d.String()); m != nil {
			known[m[1]] = true
		}
	}
	name := regexp.MustCompile(`imapgate_[a-z0-9_]+`)
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range name.FindAllString(tg.Expr, -1) {
				base := strings.TrimSuffix(m, "_bucket")
				if !known[m] && !known[base] {
					t.Errorf("panel %q queries unknown metric %s", p.Title, m)
				}
			}
		}
	}
	if len(dash.Panels) < 10 {
		t.Errorf("%d panels", len(dash.Panels))
	}
}

func TestDeploySystemdUnit(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "systemd/imapgate@.service"))
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
		"ProtectSystem=strict", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"} {
		if !strings.Contains(unit, want+"\n") {
			t.Errorf("unit lacks %s", want)
		}
	}
	var keys []string
	for _, l := range strings.Split(unit, "\n") {
		if k, _, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			keys = append(keys, k)
		}
	}
	if !slices.Contains(keys, "TimeoutStopSec") {
		t.Error("no TimeoutStopSec: systemd's default (90s) may cut a long drain short")
	}
}
