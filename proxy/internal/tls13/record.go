// Package tls13 is a TLS 1.3 record layer (RFC 8446, section 5) for
// connections whose handshake crypto/tls has done: the proxy hands a
// spliced client connection over to it after the IMAP login, so that a
// session keeps only its two traffic secrets and sequence numbers while it
// is idle (no AEAD, no buffer, no tls.Conn), and so that the splice can
// read into and seal in its own buffers, one write per chunk.
//
// Typical use (see README.md for the hand-off and its failure behaviour):
//
//	keys := new(tls13.KeyLog)            // per connection
//	cfg.KeyLogWriter = keys              // in GetConfigForClient
//	tc := tls.Server(conn, cfg); tc.Handshake()
//	// ... later, nobody reading or writing tc:
//	l, err := tls13.Takeover(tc, keys)   // err: stay on crypto/tls
//	wire, _ := l.Seal(buf, n)            // buf laid out by Slot
//	data, upd, err := l.Open(record)     // record found by RecordLen
//
// Every error that Open returns carries the alert to send (AlertOf) before
// the connection is closed; close_notify is io.EOF. The package never
// writes to a socket: the caller owns I/O, locking and buffers.
package tls13

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"hash"
	"io"

	"golang.org/x/crypto/chacha20poly1305"
)

// Record sizes (RFC 8446, section 5).
const (
	// HeaderLen is the record header: type, legacy version, length.
	HeaderLen = 5
	// MaxPlaintext is the most application data one record carries.
	MaxPlaintext = 1 << 14
	// maxCiphertext is the most a protected record's body may be.
	maxCiphertext = MaxPlaintext + 256
	// maxInner is TLSInnerPlaintext's limit: content, type and padding.
	maxInner = MaxPlaintext + 1
	tagLen   = 16 // all three AEADs
	// Overhead is what sealing adds to a record's plaintext: the header,
	// the inner content type and the tag.
	Overhead = HeaderLen + 1 + tagLen
	// SlotLen is one full record on the wire as Seal writes it.
	SlotLen = MaxPlaintext + Overhead
	// Slots is how many records Seal writes at most per call.
	Slots = 8
	// SealBufLen is the buffer Seal needs: Slots full records and room
	// for a KeyUpdate after them.
	SealBufLen   = Slots*SlotLen + keyUpdateLen
	keyUpdateLen = 5 + Overhead
)

// Content types.
const (
	typeChangeCipherSpec = 20
	typeAlert            = 21
	typeHandshake        = 22
	typeApplicationData  = 23
)

const (
	handshakeKeyUpdate = 24
	// keyUpdateAfter is how many records one write key seals before Seal
	// rotates it with a KeyUpdate of its own: well inside AES-GCM's
	// 2^24.5 full records per key (RFC 8446, section 5.5).
	keyUpdateAfter = 1 << 24
	// maxUseless bounds consecutive records that carry no application
	// data (empty records, user_canceled, KeyUpdates), as crypto/tls does.
	maxUseless = 16
)

// Suites the layer supports: every TLS 1.3 suite crypto/tls negotiates.
func supported(suite uint16) bool {
	switch suite {
	case tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384, tls.TLS_CHACHA20_POLY1305_SHA256:
		return true
	}
	return false
}

func suiteHash(suite uint16) func() hash.Hash {
	if suite == tls.TLS_AES_256_GCM_SHA384 {
		return sha512.New384
	}
	return sha256.New
}

func suiteKeyLen(suite uint16) int {
	if suite == tls.TLS_AES_128_GCM_SHA256 {
		return 16
	}
	return 32
}

// expandLabel is HKDF-Expand-Label (RFC 8446, section 7.1) with an empty
// context, keyed by m (an HMAC keyed with the secret, reset): every
// label TLS 1.3 asks of a traffic secret is at most one hash long, so
// HKDF-Expand (RFC 5869, section 2.3) is its first block alone,
// T(1) = HMAC(secret, info || 0x01). One HMAC serves a secret's key and
// IV; hkdf.Expand would key one for each.
func expandLabel(m hash.Hash, label string, length int) []byte {
	if length > m.Size() {
		panic("tls13: label longer than one block") // no suite asks for one
	}
	var info [4 + len("tls13 traffic upd") + 1]byte
	b := binary.BigEndian.AppendUint16(info[:0], uint16(length))
	b = append(b, byte(len("tls13 ")+len(label)))
	b = append(b, "tls13 "...)
	b = append(b, label...)
	b = append(b, 0, 1) // empty context, then HKDF's block counter
	m.Write(b)
	return m.Sum(nil)[:length]
}

// trafficKeys derives a record key and IV from a traffic secret
// (RFC 8446, section 7.3).
func trafficKeys(suite uint16, secret []byte) (key, iv []byte) {
	m := hmac.New(suiteHash(suite), secret)
	key = expandLabel(m, "key", suiteKeyLen(suite))
	m.Reset()
	return key, expandLabel(m, "iv", 12)
}

// nextSecret is application_traffic_secret_N+1 (RFC 8446, section 7.2).
func nextSecret(suite uint16, secret []byte) []byte {
	m := hmac.New(suiteHash(suite), secret)
	return expandLabel(m, "traffic upd", m.Size())
}

func newAEAD(suite uint16, key []byte) (cipher.AEAD, error) {
	if suite == tls.TLS_CHACHA20_POLY1305_SHA256 {
		return chacha20poly1305.New(key)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// half is one direction's protection: its traffic secret, the record
// key and IV derived from it, and its sequence number always; its AEAD
// only while awake.
type half struct {
	suite  uint16
	secret []byte
	seq    uint64
	aead   cipher.AEAD // nil while asleep
	// key[:keyLen] and iv are derived from secret at the first wake
	// (keyLen 0 until then) and kept while asleep (44 bytes), so that a
	// wake builds the AEAD without HKDF: deriving them at every wake was
	// an eighth of a login's allocations.
	key    [32]byte
	keyLen uint8
	iv     [12]byte
	// nb is the current record's nonce, set by nonce. It lives here, not
	// on the stack, because it goes through the cipher.AEAD interface and
	// would escape: one allocation per record otherwise.
	nb [12]byte
}

// errSeqLimit: the next record would need a sequence number past 2^64-1.
var errSeqLimit = errors.New("tls13: sequence number limit reached")

func (h *half) wake() error {
	if h.aead != nil {
		return nil
	}
	if h.keyLen == 0 {
		key, iv := trafficKeys(h.suite, h.secret)
		h.keyLen = uint8(copy(h.key[:], key))
		copy(h.iv[:], iv)
		clear(key)
	}
	a, err := newAEAD(h.suite, h.key[:h.keyLen])
	if err != nil {
		return err
	}
	h.aead = a
	return nil
}

func (h *half) sleep() {
	h.aead = nil
	clear(h.nb[:])
}

// update moves to the next traffic secret (KeyUpdate).
func (h *half) update() {
	next := nextSecret(h.suite, h.secret)
	clear(h.secret)
	h.secret, h.seq = next, 0
	clear(h.key[:])
	clear(h.iv[:])
	h.keyLen = 0
	h.sleep()
}

// nonce puts the next record's nonce (RFC 8446, section 5.3) in h.nb;
// it uses up the sequence number.
func (h *half) nonce() error {
	if h.seq == ^uint64(0) {
		return errSeqLimit // close rather than wrap
	}
	h.nb = h.iv
	var s [8]byte
	binary.BigEndian.PutUint64(s[:], h.seq)
	for i := range s {
		h.nb[4+i] ^= s[i]
	}
	h.seq++
	return nil
}

// seal protects rec[HeaderLen:HeaderLen+n] as one record of type typ, in
// place, and returns the record's length on the wire. rec must have room
// for n+Overhead bytes.
func (h *half) seal(rec []byte, n int, typ byte) (int, error) {
	if err := h.wake(); err != nil {
		return 0, err
	}
	if err := h.nonce(); err != nil {
		return 0, err
	}
	rec[HeaderLen+n] = typ
	body := n + 1 + tagLen
	rec[0], rec[1], rec[2] = typeApplicationData, 3, 3
	binary.BigEndian.PutUint16(rec[3:], uint16(body))
	pt := rec[HeaderLen : HeaderLen+n+1]
	h.aead.Seal(pt[:0], h.nb[:], pt, rec[:HeaderLen])
	return HeaderLen + body, nil
}

// open decrypts a whole protected record in place and returns its inner
// content and type, padding stripped.
func (h *half) open(rec []byte) ([]byte, byte, error) {
	if err := h.wake(); err != nil {
		return nil, 0, err
	}
	if err := h.nonce(); err != nil {
		return nil, 0, err
	}
	body := rec[HeaderLen:]
	if len(body) < tagLen+1 {
		return nil, 0, AlertBadRecordMAC
	}
	inner, err := h.aead.Open(body[:0], h.nb[:], body, rec[:HeaderLen])
	if err != nil {
		return nil, 0, AlertBadRecordMAC
	}
	if len(inner) > maxInner {
		return nil, 0, AlertRecordOverflow
	}
	i := len(inner) - 1
	for i >= 0 && inner[i] == 0 {
		i--
	}
	if i < 0 {
		return nil, 0, AlertUnexpectedMessage // no content type: all padding
	}
	return inner[:i], inner[i], nil
}

// Layer is the record layer of one TLS 1.3 connection after its
// handshake. Its read side (RecordLen, Open, SleepRead) belongs to the
// one goroutine that reads the connection; its write side (Seal,
// SealAlert, SealKeyUpdate, SleepWrite) must be serialised by the caller,
// which also sends what Open asks for (a KeyUpdate) under that lock. The
// two sides share no state.
type Layer struct {
	in, out half

	hs      [5]byte // a KeyUpdate split across records, the only one accepted
	hsLen   int
	useless int   // consecutive records without application data
	rerr    error // sticky: once reading failed or ended, it stays so
	wclosed bool  // close_notify or a fatal alert was sealed
}

// Suite is the negotiated cipher suite.
func (l *Layer) Suite() uint16 { return l.in.suite }

// SleepRead drops the read side's AEAD; the next Open rebuilds it from the
// secret.
func (l *Layer) SleepRead() { l.in.sleep() }

// SleepWrite drops the write side's AEAD; the next Seal rebuilds it.
func (l *Layer) SleepWrite() { l.out.sleep() }

// Awake reports whether either side holds an AEAD.
func (l *Layer) Awake() bool { return l.in.aead != nil || l.out.aead != nil }

// RecordLen looks at the record header at the start of b: it returns the
// whole record's length if b holds all of it, 0 if more bytes are needed,
// or an error (with its alert) if the header is not one of a protected
// TLS 1.3 record.
func (l *Layer) RecordLen(b []byte) (int, error) {
	if l.rerr != nil {
		return 0, l.rerr
	}
	if len(b) < 1 {
		return 0, nil
	}
	if b[0] != typeApplicationData {
		// After the handshake every record is protected: an unprotected
		// alert, handshake or change_cipher_spec has no place here.
		return 0, l.failRead(AlertUnexpectedMessage)
	}
	if len(b) < HeaderLen {
		return 0, nil
	}
	if b[1] != 3 || b[2] != 3 {
		return 0, l.failRead(AlertProtocolVersion)
	}
	n := int(binary.BigEndian.Uint16(b[3:]))
	if n > maxCiphertext {
		return 0, l.failRead(AlertRecordOverflow)
	}
	if len(b) < HeaderLen+n {
		return 0, nil
	}
	return HeaderLen + n, nil
}

func (l *Layer) failRead(a Alert) error {
	l.rerr = a
	return a
}

// Open decrypts one whole record (as RecordLen measured it) in place.
// It returns the application data it carried (possibly none: a record can
// be a KeyUpdate, an ignored user_canceled, or empty), and keyUpdate when
// the peer asked for a KeyUpdate in return, which the caller must send
// (SealKeyUpdate) before its next application data. io.EOF is the peer's
// close_notify; any other error is fatal and, when it is an Alert, the
// alert to send before closing. Errors are sticky.
func (l *Layer) Open(rec []byte) (data []byte, keyUpdate bool, err error) {
	if l.rerr != nil {
		return nil, false, l.rerr
	}
	if n, err := l.RecordLen(rec); err != nil || n != len(rec) {
		if err == nil {
			err = l.failRead(AlertInternalError) // the caller's bug
		}
		return nil, false, err
	}
	content, typ, err := l.in.open(rec)
	if err != nil {
		if a, ok := err.(Alert); ok {
			return nil, false, l.failRead(a)
		}
		l.rerr = err
		return nil, false, err
	}
	if typ != typeHandshake && l.hsLen > 0 {
		// Handshake messages must not be interleaved with other records.
		return nil, false, l.failRead(AlertUnexpectedMessage)
	}
	switch typ {
	case typeApplicationData:
		if len(content) == 0 {
			return nil, false, l.uselessRecord()
		}
		l.useless = 0
		return content, false, nil
	case typeAlert:
		if len(content) != 2 {
			return nil, false, l.failRead(AlertDecodeError)
		}
		switch Alert(content[1]) {
		case alertCloseNotify:
			l.rerr = io.EOF
			return nil, false, io.EOF
		case alertUserCanceled:
			// The one warning TLS 1.3 kept; ignored, as crypto/tls does.
			return nil, false, l.uselessRecord()
		}
		l.rerr = &RemoteAlertError{Alert: Alert(content[1])}
		return nil, false, l.rerr
	case typeHandshake:
		if len(content) == 0 {
			return nil, false, l.failRead(AlertUnexpectedMessage)
		}
		return l.handshake(content)
	}
	// change_cipher_spec inside a protected record, or an unknown type.
	return nil, false, l.failRead(AlertUnexpectedMessage)
}

func (l *Layer) uselessRecord() error {
	l.useless++
	if l.useless > maxUseless {
		return l.failRead(AlertUnexpectedMessage)
	}
	return nil
}

// handshake takes a post-handshake message's bytes. The only message a
// client may send after the handshake here is KeyUpdate: NewSessionTicket
// comes from servers only, and post-handshake authentication is never
// offered, so a Certificate, CertificateVerify or Finished is unexpected.
func (l *Layer) handshake(b []byte) ([]byte, bool, error) {
	for len(b) > 0 {
		c := b[0]
		switch l.hsLen {
		case 0:
			if c != handshakeKeyUpdate {
				return nil, false, l.failRead(AlertUnexpectedMessage)
			}
		case 1, 2:
			if c != 0 {
				return nil, false, l.failRead(AlertDecodeError)
			}
		case 3:
			if c != 1 {
				return nil, false, l.failRead(AlertDecodeError)
			}
		case 4:
			if c > 1 {
				return nil, false, l.failRead(AlertIllegalParameter)
			}
		}
		l.hs[l.hsLen] = c
		l.hsLen++
		b = b[1:]
		if l.hsLen == len(l.hs) {
			break
		}
	}
	if l.hsLen < len(l.hs) {
		return nil, false, nil // the rest comes in the next record
	}
	if len(b) > 0 {
		// A key change must end its record (RFC 8446, section 5.1).
		return nil, false, l.failRead(AlertUnexpectedMessage)
	}
	requested := l.hs[4] == 1
	l.hsLen = 0
	if err := l.uselessRecord(); err != nil {
		return nil, false, err
	}
	l.in.update()
	return nil, requested, nil
}

// Slot is where the plaintext of record i (0 ≤ i < Slots) goes in a
// buffer of SealBufLen bytes for Seal: a reader fills Slot(buf, 0) first,
// then Slot(buf, 1).
func Slot(buf []byte, i int) []byte {
	off := i*SlotLen + HeaderLen
	return buf[off : off+MaxPlaintext : off+MaxPlaintext]
}

// Seal protects n bytes of application data laid out in buf's slots (all
// of slot 0 before any of slot 1), in place, and returns the records to
// write, contiguous in buf. When the write key has sealed keyUpdateAfter
// records, Seal puts a KeyUpdate of its own after them (into buf's tail,
// so buf must be SealBufLen long) and moves to the next key.
func (l *Layer) Seal(buf []byte, n int) ([]byte, error) {
	if l.wclosed {
		return nil, errWriteClosed
	}
	if n < 0 || n > Slots*MaxPlaintext || len(buf) < SealBufLen {
		return nil, errors.New("tls13: Seal: bad buffer")
	}
	end := 0
	for i := 0; n > 0; i++ {
		m := min(n, MaxPlaintext)
		w, err := l.out.seal(buf[i*SlotLen:], m, typeApplicationData)
		if err != nil {
			return nil, err
		}
		end = i*SlotLen + w
		n -= m
	}
	if l.out.seq >= keyUpdateAfter {
		w, err := l.sealKeyUpdateAt(buf[end:], false)
		if err != nil {
			return nil, err
		}
		end += w
	}
	return buf[:end], nil
}

var errWriteClosed = errors.New("tls13: write side closed")

// SealRecord protects p (at most MaxPlaintext bytes) as one application
// data record appended to dst.
func (l *Layer) SealRecord(dst, p []byte) ([]byte, error) {
	if l.wclosed {
		return dst, errWriteClosed
	}
	if len(p) > MaxPlaintext {
		return dst, errors.New("tls13: SealRecord: too long")
	}
	off := len(dst)
	dst = append(dst, make([]byte, len(p)+Overhead)...)
	copy(dst[off+HeaderLen:], p)
	if _, err := l.out.seal(dst[off:], len(p), typeApplicationData); err != nil {
		return dst[:off], err
	}
	return dst, nil
}

// SealKeyUpdate appends a KeyUpdate record to dst, with update_requested
// when request is set, and moves the write side to its next key.
func (l *Layer) SealKeyUpdate(dst []byte, request bool) ([]byte, error) {
	if l.wclosed {
		return dst, errWriteClosed
	}
	off := len(dst)
	dst = append(dst, make([]byte, 4+1+Overhead)...)
	if _, err := l.sealKeyUpdateAt(dst[off:], request); err != nil {
		return dst[:off], err
	}
	return dst, nil
}

func (l *Layer) sealKeyUpdateAt(rec []byte, request bool) (int, error) {
	m := rec[HeaderLen:]
	m[0], m[1], m[2], m[3], m[4] = handshakeKeyUpdate, 0, 0, 1, 0
	if request {
		m[4] = 1
	}
	w, err := l.out.seal(rec, 5, typeHandshake)
	if err != nil {
		return 0, err
	}
	l.out.update()
	return w, nil
}

// SealAlert appends a fatal alert (or close_notify) record to dst; the
// write side is closed after it.
func (l *Layer) SealAlert(dst []byte, a Alert) ([]byte, error) {
	if l.wclosed {
		return dst, errWriteClosed
	}
	off := len(dst)
	dst = append(dst, make([]byte, 2+Overhead)...)
	m := dst[off+HeaderLen:]
	m[0], m[1] = 2, byte(a) // fatal; close_notify's level is ignored
	if a == alertCloseNotify {
		m[0] = 1
	}
	if _, err := l.out.seal(dst[off:], 2, typeAlert); err != nil {
		return dst[:off], err
	}
	l.wclosed = true
	l.out.sleep()
	return dst, nil
}

// WriteClosed reports whether close_notify or an alert was sealed.
func (l *Layer) WriteClosed() bool { return l.wclosed }
