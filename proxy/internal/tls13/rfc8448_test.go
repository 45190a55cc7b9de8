package tls13

import (
	"bytes"
	"crypto/tls"
	"encoding/hex"
	"strings"
	"testing"
)

// Vectors from RFC 8448, section 3 (a simple 1-RTT handshake,
// TLS_AES_128_GCM_SHA256), unless marked otherwise.

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const (
	rfcServerHandshakeSecret = `b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38`
	rfcClientAppSecret       = `9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5`
	rfcServerAppSecret       = `a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43`
	// 50 bytes, 00 to 31, sent once by each side after the handshake.
	rfcPayload = `00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f 20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d 2e 2f 30 31`
	// The client's record: the first under its application secret.
	rfcClientRecord = `17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b
		98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4`
	// The server's record: the second under its application secret (the
	// NewSessionTicket was the first).
	rfcServerRecord = `17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3
		0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d`
)

func TestRFC8448TrafficKeys(t *testing.T) {
	for _, tc := range []struct {
		name, secret, key, iv string
	}{
		{"server handshake", rfcServerHandshakeSecret, `3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc`, `5d 31 3e b2 67 12 76 ee 13 00 0b 30`},
		{"server application", rfcServerAppSecret, `9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56`, `cf 78 2b 88 dd 83 54 9a ad f1 e9 84`},
		{"client application", rfcClientAppSecret, `17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51`, `5b 78 92 3d ee 08 57 90 33 e5 23 d9`},
	} {
		key, iv := trafficKeys(tls.TLS_AES_128_GCM_SHA256, unhex(t, tc.secret))
		if !bytes.Equal(key, unhex(t, tc.key)) || !bytes.Equal(iv, unhex(t, tc.iv)) {
			t.Errorf("%s: key % x iv % x, want %s / %s", tc.name, key, iv, tc.key, tc.iv)
		}
	}
}

// The next application secrets are not in RFC 8448; these are Botan's
// (src/tests/test_tls_cipher_state.cpp), another implementation's answer.
func TestNextTrafficSecret(t *testing.T) {
	for _, tc := range []struct{ secret, next string }{
		{rfcClientAppSecret, `fc df cc 72 72 5a ae e4 8b f6 4e 4f d8 b7 49 cd bd ba b3 9d 90 da 0b 26 e2 24 5c a6 ea 16 72 07`},
		{rfcServerAppSecret, `51 92 1b 8a a3 00 19 76 eb 40 1d 0a 43 19 a8 51 64 16 a6 c5 60 01 a3 57 e5 d1 62 03 1e 84 f9 16`},
	} {
		if got := nextSecret(tls.TLS_AES_128_GCM_SHA256, unhex(t, tc.secret)); !bytes.Equal(got, unhex(t, tc.next)) {
			t.Errorf("next of %s = % x, want %s", tc.secret[:8], got, tc.next)
		}
	}
}

// The server side of RFC 8448: it opens the client's record and seals
// the same record the RFC's server sent.
func TestRFC8448Records(t *testing.T) {
	l, err := New(tls.TLS_AES_128_GCM_SHA256, unhex(t, rfcClientAppSecret), unhex(t, rfcServerAppSecret), 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	rec := unhex(t, rfcClientRecord)
	if n, err := l.RecordLen(rec); n != len(rec) || err != nil {
		t.Fatalf("RecordLen = %d, %v", n, err)
	}
	data, upd, err := l.Open(rec)
	if err != nil || upd || !bytes.Equal(data, unhex(t, rfcPayload)) {
		t.Fatalf("Open = % x, %v, %v", data, upd, err)
	}

	buf := make([]byte, SealBufLen)
	n := copy(Slot(buf, 0), unhex(t, rfcPayload))
	wire, err := l.Seal(buf, n)
	if err != nil || !bytes.Equal(wire, unhex(t, rfcServerRecord)) {
		t.Fatalf("Seal = % x, %v\nwant %s", wire, err, rfcServerRecord)
	}
	// And the same through SealRecord.
	l2, _ := New(tls.TLS_AES_128_GCM_SHA256, nil, unhex(t, rfcServerAppSecret), 0, 1)
	if got, err := l2.SealRecord(nil, unhex(t, rfcPayload)); err != nil || !bytes.Equal(got, unhex(t, rfcServerRecord)) {
		t.Fatalf("SealRecord = % x, %v", got, err)
	}
	// The client side: the same record opened, at the sequence number after
	// the NewSessionTicket.
	c, _ := New(tls.TLS_AES_128_GCM_SHA256, unhex(t, rfcServerAppSecret), unhex(t, rfcClientAppSecret), 1, 0)
	if data, _, err := c.Open(unhex(t, rfcServerRecord)); err != nil || !bytes.Equal(data, unhex(t, rfcPayload)) {
		t.Fatalf("client Open = % x, %v", data, err)
	}
	// A wrong sequence number does not open.
	c2, _ := New(tls.TLS_AES_128_GCM_SHA256, unhex(t, rfcServerAppSecret), nil, 0, 0)
	if _, _, err := c2.Open(unhex(t, rfcServerRecord)); err != AlertBadRecordMAC {
		t.Fatalf("Open at the wrong sequence number: %v, want bad_record_mac", err)
	}
}
