package testenv

import (
	"bufio"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"
)

// This file is the POP3, LMTP and ManageSieve side of StartDovecot
// (DovecotOptions.Protocols).

// otherProtocols writes the services of the protocols asked for.
func (c dovecotConfig) otherProtocols(w func(string, ...any)) {
	has := func(p string) bool { return slices.Contains(c.Protocols, p) }
	if has("pop3") {
		w("service pop3-login {")
		w("  inet_listener pop3 {")
		w("    port = %d", c.Ports[2])
		w("  }")
		w("  inet_listener pop3s {")
		w("    port = %d", c.Ports[3])
		w("    ssl = yes")
		w("  }")
		if c.Owner.rootless {
			w("  chroot =")
		}
		w("}")
		w("pop3_uidl_format = %%08Xu%%08Xv")
	}
	if has("lmtp") {
		w("service lmtp {")
		w("  inet_listener lmtp {")
		w("    port = %d", c.Ports[4])
		w("  }")
		w("}")
		// Every delivery is logged with the client address Dovecot
		// believes (XCLIENT ADDR, from login_trusted_networks).
		w("protocol lmtp {")
		w("  mail_log_prefix = \"%%s(%%u)<%%{pid}><%%{session}> rip=%%r: \"")
		w("}")
		w("lmtp_rcpt_check_quota = no")
	}
	if has("sieve") {
		w("service managesieve-login {")
		w("  inet_listener sieve {")
		w("    port = %d", c.Ports[5])
		w("  }")
		if c.Owner.rootless {
			w("  chroot =")
		}
		w("}")
		w("plugin {")
		w("  sieve = file:~/sieve;active=~/.dovecot.sieve")
		w("}")
	}
}

// otherGreetings checks that every extra protocol answers.
func (d *Dovecot) otherGreetings() error {
	for _, p := range []struct{ addr, want string }{
		{d.POP3Addr, "+OK"}, {d.LMTPAddr, "220 "}, {d.SieveAddr, "\"IMPLEMENTATION\""},
	} {
		if p.addr == "" {
			continue
		}
		if err := lineGreeting(p.addr, p.want); err != nil {
			return err
		}
	}
	return nil
}

func lineGreeting(addr, want string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("%s: reading greeting: %w", addr, err)
	}
	if !strings.HasPrefix(line, want) {
		return fmt.Errorf("%s: unexpected greeting %q", addr, line)
	}
	return nil
}
