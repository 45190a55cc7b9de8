package testenv

import (
	"os/exec"
	"strings"
	"testing"
)

func TestStartSlapd(t *testing.T) {
	s := StartSlapd(t, SlapdOptions{Users: map[string]string{"alice@example.org": "10.0.0.1"}})
	out, err := exec.Command(Bin("ldapsearch"), "-x", "-LLL", "-H", s.URL, "-D", s.BindDN, "-w", s.BindPassword,
		"-b", s.BaseDN, "(mail=alice@example.org)", "mailHost").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "mailHost: 10.0.0.1") {
		t.Fatalf("ldapsearch: %v\n%s", err, out)
	}
	s.Modify(t, "dn: uid=alice,ou=people,dc=example,dc=org\nchangetype: modify\nreplace: mailHost\nmailHost: 10.0.0.2\n")
	out, _ = exec.Command(Bin("ldapsearch"), "-x", "-LLL", "-H", s.URL, "-D", s.BindDN, "-w", s.BindPassword,
		"-b", s.BaseDN, "(mail=alice@example.org)", "mailHost").CombinedOutput()
	if !strings.Contains(string(out), "mailHost: 10.0.0.2") {
		t.Fatalf("after Modify:\n%s", out)
	}
}
