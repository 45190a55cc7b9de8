package tls13

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"testing"
)

// pair is a client and a server layer with matching secrets, in memory.
func pair(t testing.TB, suite uint16) (client, server *Layer) {
	t.Helper()
	cs, ss := bytes.Repeat([]byte{1}, 48)[:suiteHash(suite)().Size()], bytes.Repeat([]byte{2}, 48)[:suiteHash(suite)().Size()]
	client, err := New(suite, ss, cs, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	server, _ = New(suite, cs, ss, 0, 0)
	return client, server
}

// inner seals an arbitrary TLSInnerPlaintext (content, type, padding) as
// one record from h.
func inner(t testing.TB, h *half, b []byte) []byte {
	t.Helper()
	rec := make([]byte, HeaderLen+len(b)+tagLen)
	copy(rec[HeaderLen:], b[:len(b)-1])
	if _, err := h.seal(rec, len(b)-1, b[len(b)-1]); err != nil {
		t.Fatal(err)
	}
	return rec
}

var suites = []uint16{tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384, tls.TLS_CHACHA20_POLY1305_SHA256}

// Every suite round-trips through Seal and Open, and through sleep and
// wake-up between records.
func TestSuitesRoundTrip(t *testing.T) {
	for _, suite := range suites {
		c, s := pair(t, suite)
		buf := make([]byte, SealBufLen)
		for i, n := range []int{1, 5, MaxPlaintext, MaxPlaintext + 7, 2 * MaxPlaintext} {
			want := random(t, n)
			m := copy(Slot(buf, 0), want)
			copy(Slot(buf, 1), want[m:])
			wire, err := c.Seal(buf, n)
			if err != nil {
				t.Fatal(err)
			}
			var got []byte
			for len(wire) > 0 {
				rl, err := s.RecordLen(wire)
				if err != nil || rl == 0 {
					t.Fatalf("%x: RecordLen %d %v", suite, rl, err)
				}
				data, _, err := s.Open(wire[:rl])
				if err != nil {
					t.Fatalf("%x: %v", suite, err)
				}
				got = append(got, data...)
				wire = wire[rl:]
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%x: %d bytes came back wrong", suite, n)
			}
			if i%2 == 0 {
				c.SleepWrite()
				s.SleepRead()
				if c.Awake() || s.Awake() {
					t.Fatal("an AEAD survived sleep")
				}
			}
		}
	}
}

// An awake layer seals and opens records without allocating: the data
// path does this for every chunk of every spliced session.
func TestSealOpenAllocs(t *testing.T) {
	for _, suite := range suites {
		c, s := pair(t, suite)
		buf := make([]byte, SealBufLen)
		n := copy(Slot(buf, 0), "* 1 EXISTS\r\n")
		allocs := testing.AllocsPerRun(100, func() {
			wire, err := c.Seal(buf, n)
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := s.Open(wire); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%x: %v allocations per Seal and Open", suite, allocs)
		}
	}
}

func TestOpenTable(t *testing.T) {
	ku := func(v byte) []byte { return []byte{24, 0, 0, 1, v} }
	cat := func(b ...[]byte) []byte { return bytes.Join(b, nil) }
	big := bytes.Repeat([]byte{'a'}, MaxPlaintext)
	for _, tc := range []struct {
		name    string
		records [][]byte // inner plaintexts: content || type || padding
		data    string   // application data of the last record
		upd     bool
		err     error
	}{
		{name: "data", records: [][]byte{[]byte("hello\x17")}, data: "hello"},
		{name: "padding stripped", records: [][]byte{[]byte("hello\x17\x00\x00\x00\x00\x00\x00")}, data: "hello"},
		{name: "zero bytes in data kept", records: [][]byte{[]byte("a\x00\x00\x17\x00")}, data: "a\x00\x00"},
		{name: "all padding", records: [][]byte{{0, 0, 0}}, err: AlertUnexpectedMessage},
		{name: "full record", records: [][]byte{cat(big, []byte{23})}, data: string(big)},
		{name: "full record padded to the limit", records: [][]byte{cat(big, []byte{23, 0})}, err: AlertRecordOverflow},
		{name: "content over 2^14", records: [][]byte{cat(big, []byte{'a', 23})}, err: AlertRecordOverflow},
		{name: "empty data ignored", records: [][]byte{{23}}},
		{name: "17 empty records", records: bytes.Split(bytes.Repeat([]byte{23}, 17), nil), err: AlertUnexpectedMessage},
		{name: "change_cipher_spec inside", records: [][]byte{{1, 20}}, err: AlertUnexpectedMessage},
		{name: "unknown type", records: [][]byte{{1, 99}}, err: AlertUnexpectedMessage},
		{name: "KeyUpdate", records: [][]byte{cat(ku(0), []byte{22})}},
		{name: "KeyUpdate requested", records: [][]byte{cat(ku(1), []byte{22})}, upd: true},
		{name: "KeyUpdate split over records", records: [][]byte{{24, 0, 22}, {0, 1, 1, 22}}, upd: true},
		{name: "KeyUpdate bad value", records: [][]byte{cat(ku(2), []byte{22})}, err: AlertIllegalParameter},
		{name: "KeyUpdate bad length", records: [][]byte{{24, 0, 0, 2, 0, 0, 22}}, err: AlertDecodeError},
		{name: "KeyUpdate not ending its record", records: [][]byte{cat(ku(0), []byte{24, 22})}, err: AlertUnexpectedMessage},
		{name: "handshake interleaved with data", records: [][]byte{{24, 0, 22}, []byte("x\x17")}, err: AlertUnexpectedMessage},
		{name: "empty handshake record", records: [][]byte{{22}}, err: AlertUnexpectedMessage},
		{name: "NewSessionTicket from the client", records: [][]byte{{4, 0, 0, 1, 0, 22}}, err: AlertUnexpectedMessage},
		{name: "post-handshake Certificate (never asked for)", records: [][]byte{{11, 0, 0, 0, 22}}, err: AlertUnexpectedMessage},
		{name: "Finished", records: [][]byte{{20, 0, 0, 0, 22}}, err: AlertUnexpectedMessage},
		{name: "alert too long", records: [][]byte{{2, 10, 0, 21}}, err: AlertDecodeError},
		{name: "alert too short", records: [][]byte{{2, 21}}, err: AlertDecodeError},
		{name: "close_notify", records: [][]byte{{1, 0, 21}}, err: io.EOF},
		{name: "fatal alert", records: [][]byte{{2, 40, 21}}, err: &RemoteAlertError{Alert: 40}},
		{name: "user_canceled ignored", records: [][]byte{{1, 90, 21}, []byte("x\x17")}, data: "x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := pair(t, tls.TLS_AES_128_GCM_SHA256)
			var (
				data []byte
				upd  bool
				err  error
			)
			for _, r := range tc.records {
				rec := inner(t, &c.out, r)
				if n, lerr := s.RecordLen(rec); lerr != nil || n != len(rec) {
					t.Fatalf("RecordLen %d %v", n, lerr)
				}
				if data, upd, err = s.Open(rec); err != nil {
					break
				}
			}
			var ra *RemoteAlertError
			switch want := tc.err.(type) {
			case *RemoteAlertError:
				if !errors.As(err, &ra) || ra.Alert != want.Alert {
					t.Fatalf("err %v, want %v", err, want)
				}
			default:
				if err != tc.err {
					t.Fatalf("err %v, want %v", err, tc.err)
				}
			}
			if err == nil && (string(data) != tc.data || upd != tc.upd) {
				t.Fatalf("got %q upd=%v, want %q upd=%v", data, upd, tc.data, tc.upd)
			}
			if err != nil {
				// Sticky: the layer reads nothing more.
				if _, _, again := s.Open(inner(t, &c.out, []byte("y\x17"))); again == nil {
					t.Fatal("read on after a fatal error")
				}
			}
		})
	}
}

func TestRecordLenTable(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		n    int
		err  error
	}{
		{"empty", nil, 0, nil},
		{"partial header", []byte{23, 3, 3}, 0, nil},
		{"partial body", []byte{23, 3, 3, 0, 20, 1}, 0, nil},
		{"whole", append([]byte{23, 3, 3, 0, 17}, make([]byte, 17)...), 22, nil},
		{"unprotected handshake", []byte{22, 3, 1, 0, 5}, 0, AlertUnexpectedMessage},
		{"unprotected alert", []byte{21}, 0, AlertUnexpectedMessage},
		{"change_cipher_spec after the handshake", []byte{20, 3, 3, 0, 1, 1}, 0, AlertUnexpectedMessage},
		{"old version", []byte{23, 3, 1, 0, 17}, 0, AlertProtocolVersion},
		{"largest", []byte{23, 3, 3, 0x41, 0x00}, 0, nil},
		{"over 2^14+256", []byte{23, 3, 3, 0x41, 0x01}, 0, AlertRecordOverflow},
	} {
		_, s := pair(t, tls.TLS_AES_128_GCM_SHA256)
		if n, err := s.RecordLen(tc.b); n != tc.n || err != tc.err {
			t.Errorf("%s: %d, %v; want %d, %v", tc.name, n, err, tc.n, tc.err)
		}
	}
	// Too short for a tag, and a damaged tag: bad_record_mac.
	c, s := pair(t, tls.TLS_AES_128_GCM_SHA256)
	if _, _, err := s.Open([]byte{23, 3, 3, 0, 3, 1, 2, 3}); err != AlertBadRecordMAC {
		t.Errorf("short record: %v", err)
	}
	_, s = pair(t, tls.TLS_AES_128_GCM_SHA256)
	rec, _ := c.SealRecord(nil, []byte("x"))
	rec[HeaderLen] ^= 0x80
	if _, _, err := s.Open(rec); err != AlertBadRecordMAC {
		t.Errorf("damaged record: %v", err)
	}
}

// Sequence numbers never wrap: the last one is refused, both ways.
func TestSequenceLimit(t *testing.T) {
	secret := bytes.Repeat([]byte{3}, 32)
	l, _ := New(tls.TLS_AES_128_GCM_SHA256, secret, secret, ^uint64(0)-1, ^uint64(0)-1)
	peer, _ := New(tls.TLS_AES_128_GCM_SHA256, secret, secret, ^uint64(0)-1, ^uint64(0)-1)
	rec, err := l.SealRecord(nil, []byte("last"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.SealRecord(nil, []byte("wrap")); !errors.Is(err, errSeqLimit) {
		t.Fatalf("sealing past 2^64-1: %v", err)
	}
	if data, _, err := peer.Open(rec); err != nil || string(data) != "last" {
		t.Fatalf("Open the last: %q %v", data, err)
	}
	if _, _, err := peer.Open(rec); !errors.Is(err, errSeqLimit) {
		t.Fatalf("opening past 2^64-1: %v", err)
	}
}

// A write key that sealed keyUpdateAfter records is rotated by Seal.
func TestSealRotatesKey(t *testing.T) {
	secret := bytes.Repeat([]byte{4}, 32)
	w, _ := New(tls.TLS_CHACHA20_POLY1305_SHA256, nil, secret, 0, keyUpdateAfter-1)
	r, _ := New(tls.TLS_CHACHA20_POLY1305_SHA256, secret, nil, keyUpdateAfter-1, 0)
	buf := make([]byte, SealBufLen)
	for i := range 2 {
		n := copy(Slot(buf, 0), "z")
		if i == 1 {
			n = 2 * MaxPlaintext // both slots full: the KeyUpdate still fits after them
		}
		wire, err := w.Seal(buf, n)
		if err != nil {
			t.Fatal(err)
		}
		var got int
		for len(wire) > 0 {
			rl, _ := r.RecordLen(wire)
			data, upd, err := r.Open(wire[:rl])
			if err != nil || upd {
				t.Fatalf("round %d: %v %v", i, err, upd)
			}
			got += len(data)
			wire = wire[rl:]
		}
		if got != n || w.out.seq != 0 { // the KeyUpdate after the data reset it
			t.Fatalf("round %d: %d bytes, write sequence %d", i, got, w.out.seq)
		}
		w.out.seq = keyUpdateAfter
		r.in.seq = keyUpdateAfter
	}
}

// The KeyLog keeps the application secrets, nothing else, and notices a
// line of another connection.
func TestKeyLog(t *testing.T) {
	var k KeyLog
	var next bytes.Buffer
	k.Next = &next
	r := bytes.Repeat([]byte("ab"), 32)
	k.Write([]byte("CLIENT_HANDSHAKE_TRAFFIC_SECRET " + string(r) + " 00\n"))
	k.Write([]byte("CLIENT_TRAFFIC_SECRET_0 " + string(r) + " 0102\n"))
	k.Write([]byte("SERVER_TRAFFIC_SECRET_0 " + string(r) + " 0304\n"))
	if !bytes.Equal(k.client, []byte{1, 2}) || !bytes.Equal(k.server, []byte{3, 4}) || k.bad {
		t.Fatalf("client %x server %x bad %v", k.client, k.server, k.bad)
	}
	if bytes.Count(next.Bytes(), []byte("\n")) != 3 {
		t.Fatal("Next did not get every line")
	}
	k.Forget()
	if k.client != nil || k.server != nil {
		t.Fatal("Forget kept secrets")
	}
	var k2 KeyLog
	k2.Write([]byte("CLIENT_TRAFFIC_SECRET_0 " + string(r) + " 0102\n"))
	k2.Write([]byte("SERVER_TRAFFIC_SECRET_0 " + string(bytes.Repeat([]byte("cd"), 32)) + " 0304\n"))
	k2.Write([]byte("SERVER_TRAFFIC_SECRET_0 " + string(r) + "ff 0304\n"))
	if !k2.bad {
		t.Fatal("two client randoms not noticed")
	}
	for _, line := range []string{
		"CLIENT_TRAFFIC_SECRET_0 " + string(r) + "\n",
		"CLIENT_TRAFFIC_SECRET_0 " + string(r) + " \n",
		"CLIENT_TRAFFIC_SECRET_0 " + string(r[2:]) + " 0102\n",
		"CLIENT_TRAFFIC_SECRET_0 " + string(r) + " 010\n",
		"CLIENT_TRAFFIC_SECRET_0 " + string(r) + " 01 02\n",
	} {
		var k3 KeyLog
		k3.Write([]byte(line))
		if !k3.bad || k3.client != nil {
			t.Errorf("%q: bad %v, client %x", line, k3.bad, k3.client)
		}
	}
	// The three other lines of a handshake are not parsed.
	hs := []byte("SERVER_HANDSHAKE_TRAFFIC_SECRET " + string(r) + " " + string(r) + "\n")
	if n := testing.AllocsPerRun(20, func() { k.Write(hs) }); n != 0 {
		t.Errorf("a line not kept made %v allocations", n)
	}
}

// FuzzKeyLog: any line is taken or refused without a panic, and a line
// written as crypto/tls writes it is taken.
func FuzzKeyLog(f *testing.F) {
	r := bytes.Repeat([]byte("ab"), 32)
	f.Add([]byte("CLIENT_TRAFFIC_SECRET_0 "+string(r)+" 0102\n"), []byte{1, 2})
	f.Add([]byte("SERVER_TRAFFIC_SECRET_0  \n"), []byte{})
	f.Fuzz(func(t *testing.T, line, secret []byte) {
		var k KeyLog
		k.Write(line)
		if k.bad && (k.client != nil || k.server != nil) {
			t.Fatalf("%q: kept a secret and refused the line", line)
		}
		if len(secret) == 0 {
			return
		}
		var good KeyLog
		good.Write(fmt.Appendf(nil, "%s %x %x\n", "SERVER_TRAFFIC_SECRET_0", r[:32], secret))
		if good.bad || !bytes.Equal(good.server, secret) {
			t.Fatalf("secret %x: bad %v, kept %x", secret, good.bad, good.server)
		}
	})
}

// A direction that wakes again builds its AEAD from the key kept asleep:
// no HKDF, so no more allocations than the AEAD's own.
func TestWakeDerivesOnce(t *testing.T) {
	for _, suite := range suites {
		c, s := pair(t, suite)
		buf := make([]byte, SealBufLen)
		n := copy(Slot(buf, 0), "* 1 EXISTS\r\n")
		wire, err := c.Seal(buf, n)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Open(wire); err != nil {
			t.Fatal(err)
		}
		key, _ := trafficKeys(suite, c.out.secret)
		aead := testing.AllocsPerRun(50, func() {
			if _, err := newAEAD(suite, key); err != nil {
				t.Fatal(err)
			}
		})
		wake := testing.AllocsPerRun(50, func() {
			c.SleepWrite()
			if err := c.out.wake(); err != nil {
				t.Fatal(err)
			}
		})
		if wake > aead {
			t.Errorf("%x: a wake makes %v allocations, its AEAD %v", suite, wake, aead)
		}
		c.SleepWrite()
		s.SleepRead()
		n = copy(Slot(buf, 0), "* 2 EXISTS\r\n")
		wire, err = c.Seal(buf, n)
		if err != nil {
			t.Fatal(err)
		}
		if data, _, err := s.Open(wire); err != nil || string(data) != "* 2 EXISTS\r\n" {
			t.Fatalf("%x: after sleeping: %q %v", suite, data, err)
		}
	}
}
