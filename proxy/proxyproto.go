package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"

	"github.com/pires/go-proxyproto"
)

// This file reads the PROXY protocol header a trusted load balancer sends
// first, and writes one to backends that want it. The header is read
// with exact-length reads, never through a buffer that could swallow the
// bytes after it: the connection stays a plain *net.TCPConn with nothing
// read ahead, which the TLS handshake and the splice rely on.

var proxyV2Sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

// maxProxyV2Len bounds the address and TLV part of a v2 header.
const maxProxyV2Len = 1024

// readProxyHeader reads a v1 or v2 PROXY header from c and returns the
// client and destination addresses it carries. A LOCAL (health check)
// header returns ok=false: keep the connection's own addresses.
func readProxyHeader(c net.Conn) (src, dst netip.AddrPort, ok bool, err error) {
	hdr := make([]byte, 16, 128)
	if _, err := io.ReadFull(c, hdr[:8]); err != nil {
		return src, dst, false, err
	}
	switch {
	case bytes.HasPrefix(hdr[:8], []byte("PROXY ")):
		hdr = hdr[:8]
		var one [1]byte
		for hdr[len(hdr)-1] != '\n' {
			if len(hdr) >= 107 { // the longest v1 header
				return src, dst, false, errors.New("PROXY v1 header too long")
			}
			if _, err := io.ReadFull(c, one[:]); err != nil {
				return src, dst, false, err
			}
			hdr = append(hdr, one[0])
		}
	case bytes.Equal(hdr[:8], proxyV2Sig[:8]):
		if _, err := io.ReadFull(c, hdr[8:16]); err != nil {
			return src, dst, false, err
		}
		n := int(binary.BigEndian.Uint16(hdr[14:16]))
		if n > maxProxyV2Len {
			return src, dst, false, errors.New("PROXY v2 header too long")
		}
		hdr = append(hdr, make([]byte, n)...)
		if _, err := io.ReadFull(c, hdr[16:]); err != nil {
			return src, dst, false, err
		}
	default:
		return src, dst, false, errors.New("no PROXY protocol header from a peer that must send one")
	}
	h, err := proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(hdr), len(hdr)+16))
	if err != nil {
		return src, dst, false, err
	}
	s, d, isTCP := h.TCPAddrs()
	if h.Command.IsLocal() || !isTCP {
		return src, dst, false, nil
	}
	return normalize(s.AddrPort()), normalize(d.AddrPort()), true, nil
}

func normalize(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// writeProxyHeader sends a PROXY header for a client at src that connected
// to dst.
func writeProxyHeader(w io.Writer, version int, src, dst netip.AddrPort) error {
	h := proxyproto.HeaderProxyFromAddrs(byte(version), net.TCPAddrFromAddrPort(src), net.TCPAddrFromAddrPort(dst))
	_, err := h.WriteTo(w)
	return err
}
