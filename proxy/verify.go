package proxy

import (
	"bufio"
	"context"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// PasswdFile is a PasswordVerifier reading "user:hash" lines, for
// master-user logins where imapgate itself checks passwords. A hash is a
// bcrypt hash ("$2y$...", optionally written "{BLF-CRYPT}$2y$...", as
// Dovecot's passwd-files do) or "{PLAIN}secret" for tests. Blank lines
// and lines starting with '#' are ignored; user names are case-folded.
type PasswdFile struct {
	users map[string]string
}

var _ PasswordVerifier = (*PasswdFile)(nil)

// LoadPasswdFile reads a passwd file.
func LoadPasswdFile(path string) (*PasswdFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pf := &PasswdFile{users: make(map[string]string)}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		user, hash, ok := strings.Cut(line, ":")
		hash, _, _ = strings.Cut(hash, ":") // Dovecot-style extra fields
		hash = strings.TrimPrefix(hash, "{BLF-CRYPT}")
		if !ok || user == "" || !(strings.HasPrefix(hash, "$2") || strings.HasPrefix(hash, "{PLAIN}")) {
			return nil, fmt.Errorf("%s:%d: want user:{BLF-CRYPT}$2y$... or user:{PLAIN}password", path, n)
		}
		pf.users[strings.ToLower(user)] = hash
	}
	return pf, sc.Err()
}

// VerifyPassword implements PasswordVerifier.
func (p *PasswdFile) VerifyPassword(_ context.Context, user, pass string) error {
	hash, ok := p.users[strings.ToLower(user)]
	switch {
	case !ok:
		// Spend the same time as a real check, so probing for user names
		// by timing learns nothing.
		bcrypt.CompareHashAndPassword(dummyHash, []byte(pass))
	case strings.HasPrefix(hash, "{PLAIN}"):
		if subtle.ConstantTimeCompare([]byte(hash[len("{PLAIN}"):]), []byte(pass)) == 1 {
			return nil
		}
	default:
		if bcrypt.CompareHashAndPassword([]byte(hash), []byte(pass)) == nil {
			return nil
		}
	}
	return ErrBadPassword
}

var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("imapgate"), bcrypt.MinCost)
