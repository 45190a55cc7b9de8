package proxy

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

func TestPasswdFile(t *testing.T) {
	h, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	f := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(f, []byte("# users\nalice@example.org:{BLF-CRYPT}"+string(h)+"\nBob:{PLAIN}bobpass::extra\n\n"), 0o600)
	pf, err := LoadPasswdFile(f)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		user, pass string
		ok         bool
	}{
		{"alice@example.org", "s3cret", true},
		{"ALICE@example.org", "s3cret", true},
		{"alice@example.org", "wrong", false},
		{"bob", "bobpass", true},
		{"bob", "bobpas", false},
		{"nobody", "s3cret", false},
	} {
		err := pf.VerifyPassword(context.Background(), tt.user, tt.pass)
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrBadPassword)) {
			t.Errorf("VerifyPassword(%q, %q) = %v, want ok=%v", tt.user, tt.pass, err, tt.ok)
		}
	}
	os.WriteFile(f, []byte("alice:md5hash\n"), 0o600)
	if _, err := LoadPasswdFile(f); err == nil {
		t.Error("accepted an unknown hash scheme")
	}
}
