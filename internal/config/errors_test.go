package config

import (
	"strings"
	"testing"
)

// TestErrorsQuoteNoValue: a value that does not parse is never repeated
// in the error (it may be a secret), while the line and key are named.
func TestErrorsQuoteNoValue(t *testing.T) {
	for _, tc := range []struct {
		text, key string
		line      int
	}{
		{"[http]\nadmin_token = s3cretvalue\n", "admin_token", 2},
		{"[http]\nadmin_token = 123s3cret\n", "admin_token", 2},
		{"[http]\nadmin_token = \"ok\" s3cret\n", "admin_token", 2},
		{"[http]\nadmin_token = \"s3cret\n", "admin_token", 2},
		{"[consul]\n\ntoken = s3 cret\n", "token", 3},
		{"[backend.master]\nuser = \"m\"\npassword = s3cret\n", "password", 3},
		{"[backend.master]\npassword = \"\"\"s3cret\n", "password", 2},
		{"[timeouts]\nidle = \"s3cret\"\n", "idle", 2},
	} {
		_, err := Parse(tc.text)
		if err == nil {
			t.Errorf("%q parsed", tc.text)
			continue
		}
		msg := err.Error()
		for _, frag := range []string{"s3", "s\"", "\"s", "'s", "1"} {
			if strings.Contains(msg, frag) && !strings.Contains("line 1", frag) {
				t.Errorf("%q: error %q quotes the value (%q)", tc.text, msg, frag)
			}
		}
		if !strings.Contains(msg, tc.key) || !strings.Contains(msg, "line "+string(rune('0'+tc.line))) {
			t.Errorf("%q: error %q does not name key %s and line %d", tc.text, msg, tc.key, tc.line)
		}
	}
}

func TestCheckAdminExposure(t *testing.T) {
	for _, tc := range []struct {
		addr, token string
		ok          bool
	}{
		{"127.0.0.1:8080", "", true},
		{"[::1]:8080", "", true},
		{"0.0.0.0:8080", "", false},
		{"[::]:8080", "", false},
		{":8080", "", false},
		{"localhost:8080", "", false}, // a name may resolve anywhere
		{"0.0.0.0:8080", "t", true},
	} {
		if err := CheckAdminExposure(tc.addr, tc.token); (err == nil) != tc.ok {
			t.Errorf("CheckAdminExposure(%q, %q) = %v", tc.addr, tc.token, err)
		}
	}
}
