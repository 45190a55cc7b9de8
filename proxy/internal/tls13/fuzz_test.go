package tls13

import (
	"crypto/tls"
	"testing"
)

// FuzzRecords feeds a byte stream to a server layer as a client would
// send it: RecordLen and Open must never panic, never hand out more than
// a record's worth of data, and stop for good at the first error.
func FuzzRecords(f *testing.F) {
	c, _ := pair(f, tls.TLS_AES_128_GCM_SHA256)
	var seed []byte
	for _, r := range [][]byte{[]byte("a1 LOGIN x y\r\n\x17"), {24, 0, 0, 1, 1, 22}, []byte("b\x17\x00\x00"), {1, 0, 21}} {
		seed = append(seed, inner(f, &c.out, r)...)
	}
	f.Add(seed)
	f.Add([]byte{23, 3, 3, 0, 17})
	f.Add([]byte{22, 3, 1, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, s := pair(t, tls.TLS_AES_128_GCM_SHA256)
		for len(b) > 0 {
			n, err := s.RecordLen(b)
			if err != nil || n == 0 {
				return
			}
			data, _, err := s.Open(b[:n])
			if len(data) > MaxPlaintext {
				t.Fatalf("%d bytes from one record", len(data))
			}
			if err != nil {
				if _, _, again := s.Open(b[:n]); again == nil {
					t.Fatal("not sticky")
				}
				return
			}
			b = b[n:]
		}
	})
}

// FuzzInner seals arbitrary inner plaintexts, so that the fuzzer reaches
// what comes after decryption: content types, padding, handshake
// messages, alerts.
func FuzzInner(f *testing.F) {
	for _, s := range [][]byte{[]byte("x\x17"), {24, 0, 0, 1, 1, 22}, {24, 0, 22}, {0, 0}, {2, 40, 21}, {1, 90, 21}, {4, 0, 0, 1, 0, 22}} {
		f.Add(s, []byte("y\x17"))
	}
	f.Fuzz(func(t *testing.T, a, b []byte) {
		if len(a) == 0 || len(b) == 0 || len(a) > maxCiphertext-tagLen || len(b) > maxCiphertext-tagLen {
			return
		}
		c, s := pair(t, tls.TLS_CHACHA20_POLY1305_SHA256)
		for _, p := range [][]byte{a, b} {
			rec := inner(t, &c.out, p)
			n, err := s.RecordLen(rec)
			if err != nil || n != len(rec) {
				t.Fatalf("RecordLen of a sealed record: %d %v", n, err)
			}
			data, _, err := s.Open(rec)
			if err != nil {
				return
			}
			if len(data) > MaxPlaintext || len(p) > maxInner {
				t.Fatalf("accepted %d bytes of inner plaintext", len(p))
			}
		}
	})
}
