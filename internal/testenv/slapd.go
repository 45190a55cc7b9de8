package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SlapdOptions configures StartSlapd. The zero value is a directory with
// no users under dc=example,dc=org.
type SlapdOptions struct {
	// Users are inetOrgPerson entries uid=<local part> (mail=<user>) under
	// ou=people, each with mailHost = the map's value when it is not "".
	Users map[string]string
	// LDIF is added as well, after the base entries and Users.
	LDIF string
}

// Slapd is a running OpenLDAP server started by StartSlapd.
type Slapd struct {
	URL    string // ldap://127.0.0.1:PORT (StartTLS available)
	LDAPS  string // ldaps://127.0.0.1:PORT
	CA     *TestCA
	BaseDN string // dc=example,dc=org
	// BindDN and BindPassword are the directory's administrator.
	BindDN, BindPassword string
	Dir                  string

	conf string
	proc *process
}

const slapdSuffix = "dc=example,dc=org"

// StartSlapd writes a standalone slapd.conf (the mdb backend, the core,
// cosine, inetorgperson and misc schemas, TLS with a test CA) into a fresh
// directory, loads the entries with slapadd, and starts slapd on two
// loopback ports (ldap and ldaps). It returns once both answer; t.Cleanup
// stops it and removes the directory.
func StartSlapd(t testing.TB, opts SlapdOptions) *Slapd {
	t.Helper()
	Need(t, "slapd", "slapadd")
	dir, err := os.MkdirTemp("", "imapgate-slapd-")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ports, err := freePorts(2, false)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	s := &Slapd{
		URL:          "ldap://127.0.0.1:" + strconv.Itoa(ports[0]),
		LDAPS:        "ldaps://127.0.0.1:" + strconv.Itoa(ports[1]),
		CA:           NewTestCA(t),
		BaseDN:       slapdSuffix,
		BindDN:       "cn=admin," + slapdSuffix,
		BindPassword: "admin secret",
		Dir:          dir,
		conf:         filepath.Join(dir, "slapd.conf"),
	}
	if err := s.write(opts); err != nil {
		t.Fatalf("testenv: slapd config: %v", err)
	}
	if out, err := exec.Command(Bin("slapadd"), "-f", s.conf, "-l", filepath.Join(dir, "data.ldif")).CombinedOutput(); err != nil {
		t.Fatalf("testenv: slapadd: %v\n%s", err, out)
	}
	t0 := time.Now()
	cmd := exec.Command(Bin("slapd"), "-f", s.conf, "-h", s.URL+"/ "+s.LDAPS+"/", "-d", "0")
	logf, err := os.Create(filepath.Join(dir, "slapd.log"))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if s.proc, err = startProcess(cmd); err != nil {
		logf.Close()
		t.Fatalf("testenv: start slapd: %v", err)
	}
	t.Cleanup(func() {
		if err := s.proc.stop(syscall.SIGTERM, 5*time.Second); err != nil {
			t.Errorf("testenv: stop slapd: %v", err)
		}
		logf.Close()
	})
	ready := func() error {
		for _, p := range ports {
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p), time.Second)
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	}
	if err := waitFor(s.proc, 15*time.Second, ready); err != nil {
		t.Fatalf("testenv: slapd: %v\n%s", err, readFile(logf.Name()))
	}
	t.Logf("testenv: slapd on %s and %s ready in %v", s.URL, s.LDAPS, time.Since(t0).Round(time.Millisecond))
	return s
}

func (s *Slapd) write(opts SlapdOptions) error {
	schema := "/etc/ldap/schema"
	var conf strings.Builder
	for _, sc := range []string{"core", "cosine", "inetorgperson", "misc"} {
		fmt.Fprintf(&conf, "include %s/%s.schema\n", schema, sc)
	}
	fmt.Fprintf(&conf, `pidfile %[1]s/slapd.pid
argsfile %[1]s/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile %[2]s
TLSCertificateFile %[3]s
TLSCertificateKeyFile %[4]s
loglevel none

database mdb
maxsize 16777216
suffix %[5]q
rootdn %[6]q
rootpw %[7]q
directory %[1]s/db
index mail eq
access to * by dn.exact=%[6]q manage by * none
`, s.Dir, s.CA.CAFile, s.CA.ServerCertFile, s.CA.ServerKeyFile, slapdSuffix, s.BindDN, s.BindPassword)
	if err := os.Mkdir(filepath.Join(s.Dir, "db"), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(s.conf, []byte(conf.String()), 0o600); err != nil {
		return err
	}
	var ldif strings.Builder
	fmt.Fprintf(&ldif, "dn: %s\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: example\n\n", slapdSuffix)
	fmt.Fprintf(&ldif, "dn: ou=people,%s\nobjectClass: organizationalUnit\nou: people\n\n", slapdSuffix)
	users := make([]string, 0, len(opts.Users))
	for u := range opts.Users {
		users = append(users, u)
	}
	sort.Strings(users)
	for _, u := range users {
		uid := u
		if i := strings.LastIndexByte(u, '@'); i >= 0 {
			uid = u[:i]
		}
		fmt.Fprintf(&ldif, "dn: uid=%s,ou=people,%s\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: %s\ncn: %s\nsn: %s\nmail: %s\n", uid, slapdSuffix, uid, uid, uid, u)
		if h := opts.Users[u]; h != "" {
			fmt.Fprintf(&ldif, "mailHost: %s\n", h)
		}
		ldif.WriteString("\n")
	}
	ldif.WriteString(opts.LDIF)
	return os.WriteFile(filepath.Join(s.Dir, "data.ldif"), []byte(ldif.String()), 0o600)
}

// Modify runs ldapmodify as the administrator with an LDIF change.
func (s *Slapd) Modify(t testing.TB, ldif string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, Bin("ldapmodify"), "-x", "-H", s.URL, "-D", s.BindDN, "-w", s.BindPassword)
	cmd.Stdin = strings.NewReader(ldif)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("testenv: ldapmodify: %v\n%s", err, out)
	}
}
