// Command debian builds imapgate's Debian package from nfpm.yaml with the
// nfpm library (github.com/goreleaser/nfpm), the package manager-free
// way: no dpkg-deb, no debhelper, the same result on any machine with Go.
//
// Usage, from this directory:
//
//	go run . -binary /tmp/out/imapgate -version 0.3.0 -out /tmp/out
//
// It stages the two generated files that nfpm.yaml names (the systemd unit
// with Debian's paths, and the man page made from `imapgate -h`), then
// writes <out>/imapgate_<version>_amd64.deb and prints its path.
//
// It is a module of its own so that nfpm's dependencies never reach
// imapgate's go.mod.
package main

import (
	"bytes"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the "deb" packager
)

func main() {
	bin := flag.String("binary", "", "the imapgate `binary` to package (static, linux/amd64)")
	version := flag.String("version", "", "Debian `version` of the package (e.g. 0.3.0 or 0.3.0~git20261201.abc1234)")
	out := flag.String("out", ".", "`directory` to write the .deb to")
	flag.Parse()
	path, err := build(*bin, *version, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "debian:", err)
		os.Exit(1)
	}
	fmt.Println(path)
}

func build(bin, version, out string) (string, error) {
	if bin == "" || version == "" {
		return "", errors.New("-binary and -version are required")
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return "", err
	}
	stage, err := os.MkdirTemp("", "imapgate-deb-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(stage)
	if err := stageUnit(filepath.Join("..", "systemd", "imapgate@.service"), filepath.Join(stage, "imapgate@.service")); err != nil {
		return "", err
	}
	if err := stageMan(bin, version, filepath.Join(stage, "imapgate.1.gz")); err != nil {
		return "", err
	}
	vars := map[string]string{"IMAPGATE_BINARY": bin, "IMAPGATE_VERSION": version, "IMAPGATE_STAGE": stage}
	cfg, err := nfpm.ParseFileWithEnvMapping("nfpm.yaml", func(k string) string { return vars[k] })
	if err != nil {
		return "", err
	}
	info, err := cfg.Get("deb")
	if err != nil {
		return "", err
	}
	info = nfpm.WithDefaults(info)
	if err := nfpm.Validate(info); err != nil {
		return "", err
	}
	pkg, err := nfpm.Get("deb")
	if err != nil {
		return "", err
	}
	target := filepath.Join(out, pkg.ConventionalFileName(info))
	f, err := os.Create(target)
	if err != nil {
		return "", err
	}
	info.Target = target
	if err := pkg.Package(info, f); err != nil {
		f.Close()
		os.Remove(target)
		return "", err
	}
	return target, f.Close()
}

// stageUnit copies deploy/systemd's unit with Debian's binary path
// (/usr/bin, not /usr/local/bin) and DefaultInstance=main, so that
// enabling the template enables imapgate@main.
func stageUnit(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	s := strings.ReplaceAll(string(b), "/usr/local/bin/imapgate", "/usr/bin/imapgate")
	if !strings.Contains(s, "\n[Install]\n") {
		return fmt.Errorf("%s: no [Install] section", src)
	}
	s = strings.Replace(s, "\n[Install]\n", "\n[Install]\nDefaultInstance=main\n", 1)
	// The comment's manual steps are what the package does for you.
	s = strings.Replace(s, "# imapgate as a systemd service.", "# imapgate as a systemd service, installed by the Debian package (which\n# made the user and enabled imapgate@main; start it with\n# `systemctl start imapgate@main`).", 1)
	return os.WriteFile(dst, []byte(s), 0o644)
}

// stageMan writes a man page whose body is the binary's own -h text, so
// the two never disagree.
func stageMan(bin, version, dst string) error {
	var help bytes.Buffer
	cmd := exec.Command(bin, "-h")
	cmd.Stdout, cmd.Stderr = &help, &help
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s -h: %v\n%s", bin, err, help.String())
	}
	var roff strings.Builder
	fmt.Fprintf(&roff, ".TH IMAPGATE 1 %q %q \"imapgate manual\"\n", time.Now().UTC().Format("2006-01-02"), "imapgate "+version)
	roff.WriteString(".SH NAME\nimapgate \\- IMAP reverse proxy and load balancer\n")
	roff.WriteString(".SH SYNOPSIS\n.B imapgate\n\\-config /etc/imapgate/imapgate.toml\n.br\n.B imapgate\ncheck FILE\n.br\n.B imapgate\nctl COMMAND ...\n.br\n.B imapgate\nversion\n")
	roff.WriteString(".SH DESCRIPTION\nimapgate terminates TLS, answers IMAP clients until they log in, finds each user's backend, logs in there with the client's credentials and splices the rest of the session through.\n")
	roff.WriteString(".SH OPTIONS\n.nf\n")
	for l := range strings.Lines(help.String()) {
		l = strings.ReplaceAll(l, `\`, `\e`)
		if strings.HasPrefix(l, ".") || strings.HasPrefix(l, "'") {
			l = `\&` + l
		}
		roff.WriteString(l)
	}
	roff.WriteString(".fi\n.SH FILES\n.TP\n/etc/imapgate/imapgate.toml\nthe configuration (every key: /usr/share/doc/imapgate/examples/imapgate.toml)\n.TP\n/var/lib/imapgate\nstate: ACME certificates and account\n")
	roff.WriteString(".SH SEE ALSO\n.BR systemctl (1),\n/usr/share/doc/imapgate/README.deploy.md\n")
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	zw := gzip.NewWriter(f)
	zw.ModTime = time.Time{}
	if _, err := zw.Write([]byte(roff.String())); err != nil {
		f.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
