package proxy

import (
	"bytes"
	"crypto/tls"
	"reflect"
	"unsafe"
)

// crypto/tls never gives back the buffers a connection's reads grew: the
// raw record buffer (2 KiB for the ClientHello, a whole 16 KiB record plus
// growth after any upload, such as a client saving a sent message) and
// the handshake buffer stay for the connection's life (golang/go#43563).
// An idle IMAP session lives for hours, and those buffers were most of its
// heap. releaseTLSBuffers drops them when they are empty, as a session
// parks; the next read allocates what it needs again.
//
// It reaches three unexported fields of tls.Conn, found by name and type
// at start-up: if a Go release renames or retypes them, nothing is
// released (TestReleaseTLSBuffersFindsFields fails, so the upgrade is
// noticed). Only the goroutine that reads the connection may call it, with
// no Read in progress; it touches nothing but empty buffers, so no byte of
// the stream and no protocol state is affected.
var tlsBufs = findTLSBufs()

type tlsBufOffsets struct {
	ok                    bool
	rawInput, input, hand uintptr
}

func findTLSBufs() tlsBufOffsets {
	t := reflect.TypeFor[tls.Conn]()
	field := func(name string, typ reflect.Type) (uintptr, bool) {
		f, ok := t.FieldByName(name)
		if !ok || f.Type != typ || len(f.Index) != 1 {
			return 0, false
		}
		return f.Offset, true
	}
	var o tlsBufOffsets
	var ok1, ok2, ok3 bool
	o.rawInput, ok1 = field("rawInput", reflect.TypeFor[bytes.Buffer]())
	o.input, ok2 = field("input", reflect.TypeFor[bytes.Reader]())
	o.hand, ok3 = field("hand", reflect.TypeFor[bytes.Buffer]())
	o.ok = ok1 && ok2 && ok3
	return o
}

// releaseTLSBuffers drops c's read buffers if they hold nothing, and
// reports whether it did.
func releaseTLSBuffers(c *tls.Conn) bool {
	if !tlsBufs.ok {
		return false
	}
	base := unsafe.Pointer(c)
	raw := (*bytes.Buffer)(unsafe.Add(base, tlsBufs.rawInput))
	in := (*bytes.Reader)(unsafe.Add(base, tlsBufs.input))
	hand := (*bytes.Buffer)(unsafe.Add(base, tlsBufs.hand))
	if raw.Len() != 0 || in.Len() != 0 || hand.Len() != 0 {
		return false // a partial record or unread bytes: keep them
	}
	*raw = bytes.Buffer{}
	in.Reset(nil) // it still points into the old record buffer
	*hand = bytes.Buffer{}
	return true
}
