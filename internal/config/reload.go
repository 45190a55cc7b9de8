package config

import (
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// What a reload does with each key is written next to the key's
// definition, in the reload tag of the Config fields (a field without one
// follows its section):
//
//	reload:"live"                  applied by the reload
//	reload:"restart"               kept at its start-up value until a restart
//	reload:"live,acme=restart"     live, but restart while ACME is in use
//	reload:"live,external=restart" live, but restart when the router's table
//	                               comes from outside the file (consul, http, ldap)
//	reload:"live,external=ignored" live, but unused by such a router
//
// PlanReload reads the tags: the reload's report and the configuration it
// puts in force come from the same table.

// ReloadClass is what a reload does with a changed key.
type ReloadClass uint8

const (
	// ReloadLive keys are applied by a reload.
	ReloadLive ReloadClass = iota
	// ReloadRestart keys keep their start-up values until a restart.
	ReloadRestart
	// ReloadIgnored keys are applied but unused by the running router.
	ReloadIgnored
)

var reloadClassNames = []string{"live", "restart", "ignored"}

func (c ReloadClass) String() string { return kindName(reloadClassNames, int(c)) }

// reloadRule is one parsed reload tag.
type reloadRule struct {
	base           ReloadClass
	acme, external *ReloadClass // nil: as base
}

// reloadEnv is what the rules' conditions depend on.
type reloadEnv struct{ acme, external bool }

func (r reloadRule) class(env reloadEnv) ReloadClass {
	switch {
	case env.acme && r.acme != nil:
		return *r.acme
	case env.external && r.external != nil:
		return *r.external
	}
	return r.base
}

// ruleOf returns the rule of field f inside a section whose rule is
// parent.
func ruleOf(f reflect.StructField, parent reloadRule) reloadRule {
	tag, ok := f.Tag.Lookup("reload")
	if !ok {
		return parent
	}
	parse := func(s string) ReloadClass {
		i := slices.Index(reloadClassNames, s)
		if i < 0 {
			panic(fmt.Sprintf("config: field %s: unknown reload class %q", f.Name, s))
		}
		return ReloadClass(i)
	}
	parts := strings.Split(tag, ",")
	r := reloadRule{base: parse(parts[0])}
	for _, p := range parts[1:] {
		cond, cl, _ := strings.Cut(p, "=")
		c := parse(cl)
		switch cond {
		case "acme":
			r.acme = &c
		case "external":
			r.external = &c
		default:
			panic(fmt.Sprintf("config: field %s: unknown reload condition %q", f.Name, cond))
		}
	}
	return r
}

// ReloadPlan is what a reload from the configuration in force to a new
// file does.
type ReloadPlan struct {
	// Applied are the keys changed since the configuration in force that
	// the reload applies, sorted.
	Applied []string
	// Restart are the keys that differ from the start-up configuration
	// and only a restart applies (their start-up values stay in force).
	Restart []string
	// Ignored are changed keys the running router does not use.
	Ignored []string
	// InForce is next with the restart-only keys at their start-up values:
	// the configuration in force after the reload.
	InForce *Config
}

// PlanReload compares next with boot (the configuration the process
// started with) and old (the one in force) as the reload tags say.
// Values never appear in the plan's key lists: some are secrets.
func PlanReload(boot, old, next *Config) ReloadPlan {
	env := reloadEnv{acme: old.TLS.UsesACME() || next.TLS.UsesACME(), external: boot.Routing.Router.External()}
	p := ReloadPlan{Applied: []string{}, Restart: []string{}}
	for _, k := range diff(old, next) {
		switch k.rule.class(env) {
		case ReloadLive:
			p.Applied = append(p.Applied, k.key)
		case ReloadIgnored:
			p.Ignored = append(p.Ignored, k.key)
		}
	}
	for _, k := range diff(boot, next) {
		if k.rule.class(env) == ReloadRestart {
			p.Restart = append(p.Restart, k.key)
		}
	}
	in := *next
	keepRestart(reflect.ValueOf(&in).Elem(), reflect.ValueOf(boot).Elem(), reloadRule{}, env)
	p.InForce = &in
	return p
}

// keepRestart sets every restart-only field of dst to its value in boot.
// Sections are walked field by field (a field's tag may differ from its
// section's); anything else is copied whole.
func keepRestart(dst, boot reflect.Value, r reloadRule, env reloadEnv) {
	if dst.Kind() != reflect.Struct || dst.Type() == durationType {
		if r.class(env) == ReloadRestart {
			dst.Set(boot)
		}
		return
	}
	t := dst.Type()
	for i := range t.NumField() {
		keepRestart(dst.Field(i), boot.Field(i), ruleOf(t.Field(i), r), env)
	}
}

// reloadClassOf returns the class of a dotted key as the file spells it
// (`backends.b1.addr`, `routing.users."a@b"`, `listen[0].addr`). A key
// the schema does not know is live.
func reloadClassOf(key string, external, acme bool) ReloadClass {
	env := reloadEnv{acme: acme, external: external}
	t, r := reflect.TypeFor[Config](), reloadRule{}
	for _, seg := range splitKey(key) {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
			t = t.Elem()
		}
		switch t.Kind() {
		case reflect.Map:
			t = t.Elem() // seg is the map's key
			continue
		case reflect.Struct:
			f, ok := fieldByTOML(t, seg)
			if !ok {
				return r.class(env)
			}
			t, r = f.Type, ruleOf(f, r)
		}
	}
	return r.class(env)
}

// splitKey splits a dotted key into its segments, dropping [i] indexes
// and the quotes of quoted segments.
func splitKey(key string) []string {
	var out []string
	for key != "" {
		var seg string
		if key[0] == '"' {
			end := strings.IndexByte(key[1:], '"') + 1
			seg, key = key[1:end], key[end+1:]
		} else {
			i := strings.IndexAny(key, ".[")
			if i < 0 {
				i = len(key)
			}
			seg, key = key[:i], key[i:]
		}
		for strings.HasPrefix(key, "[") {
			key = key[strings.IndexByte(key, ']')+1:]
		}
		key = strings.TrimPrefix(key, ".")
		out = append(out, seg)
	}
	return out
}

func fieldByTOML(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		if n, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ","); n == name {
			return t.Field(i), true
		}
	}
	return reflect.StructField{}, false
}

// changedKey is a key whose value differs, with its reload rule.
type changedKey struct {
	key  string
	rule reloadRule
}

// diff returns the dotted keys (as written in the file) whose values
// differ between a and b, sorted.
func diff(a, b *Config) []changedKey {
	fa, fb := map[string]leaf{}, map[string]leaf{}
	flatten(fa, "", reflect.ValueOf(*a), reloadRule{})
	flatten(fb, "", reflect.ValueOf(*b), reloadRule{})
	var out []changedKey
	for k, v := range fa {
		if w, ok := fb[k]; !ok || w.value != v.value {
			out = append(out, changedKey{k, v.rule})
		}
	}
	for k, w := range fb {
		if _, ok := fa[k]; !ok {
			out = append(out, changedKey{k, w.rule})
		}
	}
	slices.SortFunc(out, func(x, y changedKey) int { return strings.Compare(x.key, y.key) })
	return out
}

// diffKeys is diff's keys alone.
func diffKeys(a, b *Config) []string {
	var out []string
	for _, k := range diff(a, b) {
		out = append(out, k.key)
	}
	return out
}

// leaf is one value of the file and the rule it falls under.
type leaf struct {
	value string
	rule  reloadRule
}

var durationType = reflect.TypeFor[Duration]()

// flatten records every leaf of v under its TOML key path.
func flatten(out map[string]leaf, path string, v reflect.Value, r reloadRule) {
	join := func(k string) string {
		if path == "" {
			return k
		}
		return path + "." + k
	}
	switch {
	case v.Kind() == reflect.Pointer:
		if !v.IsNil() {
			flatten(out, path, v.Elem(), r)
		}
	case v.Type() == durationType:
		out[path] = leaf{time.Duration(v.Int()).String(), r}
	case v.Kind() == reflect.Struct:
		t := v.Type()
		for i := range t.NumField() {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			flatten(out, join(name), v.Field(i), ruleOf(t.Field(i), r))
		}
	case v.Kind() == reflect.Map:
		for _, k := range slices.Sorted(func(yield func(string) bool) {
			for _, k := range v.MapKeys() {
				if !yield(k.String()) {
					return
				}
			}
		}) {
			flatten(out, join(tomlKey(k)), v.MapIndex(reflect.ValueOf(k)), r)
		}
	case v.Kind() == reflect.Slice && v.Type().Elem().Kind() == reflect.Struct:
		for i := range v.Len() {
			flatten(out, fmt.Sprintf("%s[%d]", path, i), v.Index(i), r)
		}
	default:
		out[path] = leaf{fmt.Sprintf("%v", v.Interface()), r}
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
