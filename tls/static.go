package tls

import (
	stdtls "crypto/tls"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// certSet is one immutable generation of the static certificates. A reload
// builds a new set and swaps it in whole, so a handshake sees either the
// old files or the new ones, never a mix.
type certSet struct {
	byName      map[string][]*stdtls.Certificate // exact names and "*.suffix" wildcards
	defaultCert *stdtls.Certificate              // the first configured
}

// loadCertSet reads and parses every file of files. Any failure fails the
// whole set.
func loadCertSet(files []CertFile) (*certSet, error) {
	set := &certSet{byName: make(map[string][]*stdtls.Certificate)}
	for _, f := range files {
		cert, err := stdtls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("tls: loading %s / %s: %w", f.CertFile, f.KeyFile, err)
		}
		if cert.Leaf == nil || len(cert.Leaf.DNSNames) == 0 {
			// SNI can only choose a certificate by its DNS SANs; one
			// without is still usable as the default.
			if set.defaultCert != nil {
				return nil, fmt.Errorf("tls: %s has no DNS names (subject alternative names), so SNI can never choose it; only the first certificate may lack them", f.CertFile)
			}
		} else {
			for _, n := range cert.Leaf.DNSNames {
				n = normalizeName(n)
				set.byName[n] = append(set.byName[n], &cert)
			}
		}
		if set.defaultCert == nil {
			set.defaultCert = &cert
		}
	}
	return set, nil
}

// lookup returns the certificate for name (already normalized), trying the
// exact name first and then a wildcard for its first label. Among several
// certificates for the same name (say RSA and ECDSA), the first the client
// supports wins. It returns nil if no certificate covers name.
func (s *certSet) lookup(name string, hello *stdtls.ClientHelloInfo) *stdtls.Certificate {
	if c := pick(s.byName[name], hello); c != nil {
		return c
	}
	if i := strings.IndexByte(name, '.'); i > 0 {
		return pick(s.byName["*"+name[i:]], hello)
	}
	return nil
}

func pick(certs []*stdtls.Certificate, hello *stdtls.ClientHelloInfo) *stdtls.Certificate {
	if len(certs) == 0 {
		return nil
	}
	for _, c := range certs {
		if hello.SupportsCertificate(c) == nil {
			return c
		}
	}
	return certs[0]
}

// names returns the sorted names of s, for logs.
func (s *certSet) names() []string {
	out := make([]string, 0, len(s.byName))
	for n := range s.byName {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// normalizeName lower-cases a DNS name and drops a trailing dot, so SNI
// "Mail.Example.ORG." matches a SAN "mail.example.org".
func normalizeName(n string) string {
	return strings.TrimSuffix(strings.ToLower(n), ".")
}

// fileStamp is what the watcher compares to notice a changed file.
type fileStamp struct {
	modTime int64 // Unix nanoseconds; time.Time is not comparable with ==
	size    int64
	err     bool // the file could not be stat'ed
}

func (m *Manager) stampFiles() []fileStamp {
	out := make([]fileStamp, 0, 2*len(m.cfg.Certificates))
	for _, f := range m.cfg.Certificates {
		for _, p := range []string{f.CertFile, f.KeyFile} {
			fi, err := os.Stat(p)
			if err != nil {
				out = append(out, fileStamp{err: true})
				continue
			}
			out = append(out, fileStamp{modTime: fi.ModTime().UnixNano(), size: fi.Size()})
		}
	}
	return out
}

// watchFiles polls the certificate files every interval and reloads when
// any of them changed. Polling needs no extra dependency and, unlike inotify,
// sees a file replaced by a rename (how certbot and Kubernetes secrets
// update) the same as one rewritten in place. It runs until Close.
func (m *Manager) watchFiles(interval time.Duration) {
	defer m.wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	last := m.stampFiles()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
		}
		now := m.stampFiles()
		if slices.Equal(now, last) {
			continue
		}
		// Remember the new stamps even if the reload fails: a broken file
		// is reported once, and tried again when it changes again (for
		// example when a key is written just after its certificate).
		last = now
		if err := m.Reload(); err != nil {
			m.log.Warn("tls: certificate files changed but cannot be loaded; keeping the previous certificates", zap.Error(err))
		}
	}
}
