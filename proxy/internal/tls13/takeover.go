package tls13

import (
	"bytes"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"sync"
	"sync/atomic"
	"unsafe"
)

// KeyLog collects one connection's application traffic secrets from
// crypto/tls: set it as the Config.KeyLogWriter of that connection alone
// (the config GetConfigForClient returns), never of a shared config. It
// keeps CLIENT_TRAFFIC_SECRET_0 and SERVER_TRAFFIC_SECRET_0 and ignores
// the rest (handshake secrets); Next, if set, gets every line too (an
// operator's SSLKEYLOGFILE).
type KeyLog struct {
	Next io.Writer

	mu             sync.Mutex
	random         [32]byte
	client, server []byte
	bad            bool // a line that did not parse, or two client randoms
}

// Write takes one NSS key log line, as crypto/tls writes them.
func (k *KeyLog) Write(line []byte) (int, error) {
	if k.Next != nil {
		k.Next.Write(line)
	}
	// crypto/tls writes "LABEL CLIENTRANDOM SECRET\n", hex, five lines
	// a handshake: only two are kept, and the others are not parsed.
	label, rest, _ := bytes.Cut(line, []byte(" "))
	k.mu.Lock()
	defer k.mu.Unlock()
	var dst *[]byte
	switch string(label) {
	case "CLIENT_TRAFFIC_SECRET_0":
		dst = &k.client
	case "SERVER_TRAFFIC_SECRET_0":
		dst = &k.server
	default:
		return len(line), nil
	}
	rnd, sec, ok := bytes.Cut(bytes.TrimSuffix(rest, []byte("\n")), []byte(" "))
	var random [32]byte
	secret := make([]byte, hex.DecodedLen(len(sec)))
	if !ok || len(rnd) != 2*len(random) || len(sec) == 0 || *dst != nil {
		k.bad = true
		return len(line), nil
	}
	if _, err := hex.Decode(random[:], rnd); err != nil {
		k.bad = true
		return len(line), nil
	}
	if _, err := hex.Decode(secret, sec); err != nil {
		k.bad = true
		return len(line), nil
	}
	if (k.client != nil || k.server != nil) && random != k.random {
		k.bad = true
	}
	k.random, *dst = random, secret
	return len(line), nil
}

// HasServerSecret reports whether the server's application traffic
// secret has been logged (a TLS 1.3 server's handshake is past its
// Finished). A nil KeyLog has none.
func (k *KeyLog) HasServerSecret() bool {
	if k == nil {
		return false
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.server != nil && !k.bad
}

// Forget wipes and drops the secrets (after a hand-off, or when the
// connection stays on crypto/tls).
func (k *KeyLog) Forget() {
	k.mu.Lock()
	clear(k.client)
	clear(k.server)
	k.client, k.server = nil, nil
	k.mu.Unlock()
}

// ErrNotTaken says why a connection stays on crypto/tls; the connection
// is untouched and fully usable.
type ErrNotTaken struct{ Reason string }

func (e *ErrNotTaken) Error() string { return "tls13: staying on crypto/tls: " + e.Reason }

func notTaken(r string) error { return &ErrNotTaken{Reason: r} }

// Takeover returns the record layer state of tc, whose TLS 1.3 handshake
// is complete, so that the caller can carry its records from now on. It
// fails, leaving tc as it was, unless everything below holds: the version
// of crypto/tls is one whose fields it knows (found by name and type at
// start-up); tc negotiated TLS 1.3 with a suite the layer has; keys holds
// both traffic secrets and they are the ones tc uses now (no KeyUpdate
// since); and tc holds no byte the caller has not seen: no buffered
// record, partial record, plaintext or handshake message, no record
// waiting to be sent, no error and no close_notify sent. The caller must
// ensure nobody reads, writes or closes tc during the call, and must never
// use tc again once it succeeds (closing the socket under it is fine).
func Takeover(tc *tls.Conn, keys *KeyLog) (*Layer, error) {
	o := &connLayout
	if !o.ok {
		return nil, notTaken("crypto/tls internals not recognised")
	}
	cs := tc.ConnectionState()
	switch {
	case !cs.HandshakeComplete:
		return nil, notTaken("handshake not complete")
	case cs.Version != tls.VersionTLS13:
		return nil, notTaken("not TLS 1.3")
	case !supported(cs.CipherSuite):
		return nil, notTaken("cipher suite")
	}
	keys.mu.Lock()
	client, server, bad := keys.client, keys.server, keys.bad
	keys.mu.Unlock()
	if bad || client == nil || server == nil {
		return nil, notTaken("traffic secrets not logged")
	}
	base := unsafe.Pointer(tc)
	at := func(off uintptr) unsafe.Pointer { return unsafe.Add(base, off) }
	if *(*bool)(at(o.buffering)) || len(*(*[]byte)(at(o.sendBuf))) != 0 ||
		(*bytes.Buffer)(at(o.rawInput)).Len() != 0 || (*bytes.Reader)(at(o.input)).Len() != 0 ||
		(*bytes.Buffer)(at(o.hand)).Len() != 0 {
		return nil, notTaken("bytes buffered in crypto/tls")
	}
	if *(*bool)(at(o.closeNotifySent)) || (*atomic.Int32)(at(o.activeCall)).Load() != 0 {
		return nil, notTaken("closing or writing")
	}
	in, out := at(o.in), at(o.out)
	if *(*error)(unsafe.Add(in, o.hcErr)) != nil || *(*error)(unsafe.Add(out, o.hcErr)) != nil {
		return nil, notTaken("connection failed")
	}
	if *(*bool)(at(o.isClient)) {
		client, server = server, client // read what the server writes
	}
	inSecret := *(*[]byte)(unsafe.Add(in, o.hcSecret))
	outSecret := *(*[]byte)(unsafe.Add(out, o.hcSecret))
	if subtle.ConstantTimeCompare(inSecret, client) != 1 || subtle.ConstantTimeCompare(outSecret, server) != 1 {
		return nil, notTaken("traffic secrets changed (a KeyUpdate) or not this connection's")
	}
	inSeq := binary.BigEndian.Uint64((*[8]byte)(unsafe.Add(in, o.hcSeq))[:])
	outSeq := binary.BigEndian.Uint64((*[8]byte)(unsafe.Add(out, o.hcSeq))[:])
	l := &Layer{
		in:  half{suite: cs.CipherSuite, secret: bytes.Clone(client), seq: inSeq},
		out: half{suite: cs.CipherSuite, secret: bytes.Clone(server), seq: outSeq},
	}
	return l, nil
}

// SealInFlight seals p as one application data record to follow the
// server's first flight, which tc's TLS 1.3 server handshake is writing
// now (RFC 8446, section 2: a server may send data after its Finished,
// before the client's), and moves tc's write sequence number past it, so
// that crypto/tls's next record comes after it. It must be called from
// the Write that crypto/tls makes on the connection under tc with that
// flight (the only moment nothing else touches tc's write side), and the
// record goes out after the flight's bytes, in the same write.
//
// It refuses, touching nothing, unless: the version of crypto/tls is one
// whose fields it knows; tc is a server negotiating TLS 1.3 with a suite
// the layer has; keys holds the server's application traffic secret and
// tc's write side uses it already (so the flight written now ends with the
// server's Finished and any NewSessionTicket); and p fits one record. A
// HelloRetryRequest's flight, a TLS 1.2 handshake or a flight still on
// the handshake keys is refused; the caller then writes p after the
// handshake as usual. p must be something the server says whoever the
// client turns out to be (a greeting): the client's Finished has not been
// read, so its handshake may still fail.
func SealInFlight(tc *tls.Conn, keys *KeyLog, p []byte) ([]byte, error) {
	o := &connLayout
	if !o.ok {
		return nil, notTaken("crypto/tls internals not recognised")
	}
	if len(p) > MaxPlaintext {
		return nil, notTaken("too long for one record")
	}
	base := unsafe.Pointer(tc)
	at := func(off uintptr) unsafe.Pointer { return unsafe.Add(base, off) }
	if *(*bool)(at(o.isClient)) || *(*uint16)(at(o.vers)) != tls.VersionTLS13 {
		return nil, notTaken("not a TLS 1.3 server")
	}
	suite := *(*uint16)(at(o.cipherSuite))
	if !supported(suite) {
		return nil, notTaken("cipher suite")
	}
	keys.mu.Lock()
	server, bad := keys.server, keys.bad
	keys.mu.Unlock()
	if bad || server == nil {
		return nil, notTaken("traffic secrets not logged")
	}
	out := at(o.out)
	if *(*error)(unsafe.Add(out, o.hcErr)) != nil {
		return nil, notTaken("connection failed")
	}
	if subtle.ConstantTimeCompare(*(*[]byte)(unsafe.Add(out, o.hcSecret)), server) != 1 {
		return nil, notTaken("write side not on the application traffic secret")
	}
	seqp := (*[8]byte)(unsafe.Add(out, o.hcSeq))
	seq := binary.BigEndian.Uint64(seqp[:])
	if seq >= keyUpdateAfter {
		return nil, notTaken("sequence number")
	}
	l := &Layer{out: half{suite: suite, secret: server, seq: seq}}
	rec, err := l.SealRecord(make([]byte, 0, len(p)+Overhead), p)
	l.out.sleep()
	if err != nil {
		return nil, err
	}
	binary.BigEndian.PutUint64(seqp[:], seq+1)
	return rec, nil
}

// New returns a Layer from secrets and sequence numbers directly (tests,
// vectors): in protects what is read, out what is written.
func New(suite uint16, inSecret, outSecret []byte, inSeq, outSeq uint64) (*Layer, error) {
	if !supported(suite) {
		return nil, errors.New("tls13: unsupported suite")
	}
	return &Layer{
		in:  half{suite: suite, secret: bytes.Clone(inSecret), seq: inSeq},
		out: half{suite: suite, secret: bytes.Clone(outSecret), seq: outSeq},
	}, nil
}

// Supported reports whether this Go's crypto/tls is one Takeover knows.
func Supported() bool { return connLayout.ok }

// connLayout is where tls.Conn keeps what Takeover reads, found once by
// name and type; if any field is missing or retyped, ok is false and every
// connection stays on crypto/tls (TestLayoutFound fails on such a Go).
var connLayout = findLayout()

type layout struct {
	ok                                              bool
	isClient, in, out, rawInput, input, hand        uintptr
	buffering, sendBuf, closeNotifySent, activeCall uintptr
	vers, cipherSuite                               uintptr
	hcErr, hcSeq, hcSecret                          uintptr
}

func findLayout() layout {
	var o layout
	ok := true
	field := func(t reflect.Type, name string, typ reflect.Type) uintptr {
		f, found := t.FieldByName(name)
		if !found || len(f.Index) != 1 || (typ != nil && f.Type != typ) {
			ok = false
			return 0
		}
		return f.Offset
	}
	conn := reflect.TypeFor[tls.Conn]()
	o.isClient = field(conn, "isClient", reflect.TypeFor[bool]())
	o.rawInput = field(conn, "rawInput", reflect.TypeFor[bytes.Buffer]())
	o.input = field(conn, "input", reflect.TypeFor[bytes.Reader]())
	o.hand = field(conn, "hand", reflect.TypeFor[bytes.Buffer]())
	o.buffering = field(conn, "buffering", reflect.TypeFor[bool]())
	o.sendBuf = field(conn, "sendBuf", reflect.TypeFor[[]byte]())
	o.closeNotifySent = field(conn, "closeNotifySent", reflect.TypeFor[bool]())
	o.activeCall = field(conn, "activeCall", reflect.TypeFor[atomic.Int32]())
	o.vers = field(conn, "vers", reflect.TypeFor[uint16]())
	o.cipherSuite = field(conn, "cipherSuite", reflect.TypeFor[uint16]())
	o.in = field(conn, "in", nil)
	o.out = field(conn, "out", nil)
	if !ok {
		return layout{}
	}
	hc, _ := conn.FieldByName("in")
	if out, _ := conn.FieldByName("out"); hc.Type != out.Type || hc.Type.Kind() != reflect.Struct || hc.Type.Name() != "halfConn" {
		return layout{}
	}
	o.hcErr = field(hc.Type, "err", reflect.TypeFor[error]())
	o.hcSeq = field(hc.Type, "seq", reflect.TypeFor[[8]byte]())
	o.hcSecret = field(hc.Type, "trafficSecret", reflect.TypeFor[[]byte]())
	o.ok = ok
	if !ok {
		return layout{}
	}
	return o
}
