package proxy

import (
	"errors"
	"sync"

	"golang.org/x/sys/unix"
)

// Kernel TLS (TLS_TX/TLS_RX on a socket with the "tls" upper layer
// protocol) is the record layer hand-off's other possible target. Only
// the probe is here: whether the kernel offers it decides what the start-
// up line says. The data path over it (records the kernel cannot handle,
// alerts and KeyUpdate, arrive as control messages) is not written, as no
// kernel at hand offers the ULP to test it on; sessions use imapgate's
// own record layer either way, which needs nothing from the kernel.

var kernelTLSProbe = sync.OnceValue(probeKernelTLS)

// probeKernelTLS asks for the "tls" ULP on a fresh, unconnected TCP
// socket: a kernel without it says ENOENT, one with it refuses only
// because the socket is not connected.
func probeKernelTLS() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_ULP, "tls")
}

// ulpOffered reads the probe's answer.
func ulpOffered(err error) bool {
	return err == nil || errors.Is(err, unix.ENOTCONN)
}

// kernelTLSState is the probe's answer for the log.
func kernelTLSState() string {
	err := kernelTLSProbe()
	if ulpOffered(err) {
		return "offered by the kernel, not used (no kernel TLS data path in imapgate yet)"
	}
	return "not offered by this kernel (TCP_ULP tls: " + err.Error() + ")"
}
