package config

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/BurntSushi/toml"
)

// quotedFragment matches what the TOML decoder quotes of the input in its
// messages ("found \"s\" instead", `invalid duration "x"`).
var quotedFragment = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'[^']*'`)

// redactTOMLError rewrites a decoding error so that it names the line and
// the key but quotes nothing of the file: a value that does not parse may
// be a secret (an unquoted admin_token, a password), and this message goes
// to logs and to the reload's reply.
func redactTOMLError(text string, err error) error {
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		return errors.New(quotedFragment.ReplaceAllString(err.Error(), "…"))
	}
	msg := quotedFragment.ReplaceAllString(pe.Message, "…")
	key := keyOnLine(text, pe.Position.Line)
	if lk := pe.LastKey; key == "" || lk == key || strings.HasSuffix(lk, "."+key) {
		key = lk // the full dotted key
	}
	if key == "" {
		return fmt.Errorf("line %d: %s", pe.Position.Line, msg)
	}
	return fmt.Errorf("line %d, key %s: %s", pe.Position.Line, key, msg)
}

// keyOnLine returns the key assigned on line n (1-based) of text, or "".
func keyOnLine(text string, n int) string {
	lines := strings.Split(text, "\n")
	if n < 1 || n > len(lines) {
		return ""
	}
	k, _, ok := strings.Cut(lines[n-1], "=")
	k = strings.TrimSpace(k)
	if !ok || k == "" || strings.ContainsAny(k, "[]#") {
		return ""
	}
	return k
}
