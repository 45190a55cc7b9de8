package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"time"
)

// The non-blocking splice path, taken by a direction whose source is a
// plain TCP socket copied into TLS (the backend leg) or a TLS connection
// over an nbConn (the client leg of a TLS listener). Per wake-up it makes
// the read, the write and one peek before parking (nbReader.wait), where
// the path of step and await made five or six calls: no peek before
// reading, no SIOCINQ, no read deadline set and cleared around each wait
// (the parkAfter deadline is re-armed at most about once per parkAfter),
// and no drain of tls.Conn's buffered records under a past deadline (a
// non-blocking tls.Conn.Read serves them first). The buffer is borrowed
// from the pool only while bytes move.

// loopNB is loop for a direction with an nbReader.
func (d *direction) loopNB() {
	if d.nbc != nil {
		d.nbc.nonblock = true
	}
	d.nb.drained = false // started by the parker, or for the first time: try a read
	d.lastData = mono()
	d.run(d.copyNB, errWouldBlock, d.awaitNB)
}

// copyNB copies until the source would block (errWouldBlock), ends or
// fails.
func (d *direction) copyNB() error {
	if d.rec != nil {
		if d.recSrc {
			return d.copyRecordsIn()
		}
		return d.copyRecordsOut()
	}
	var bp *[]byte
	defer func() {
		if bp != nil {
			copyBufs.Put(bp)
		}
	}()
	for {
		if bp == nil {
			bp = copyBufs.Get().(*[]byte)
		}
		var (
			n   int
			err error
		)
		if d.srcTLS != nil {
			n, err = d.srcTLS.Read(*bp)
		} else {
			n, err = d.nb.read(*bp)
		}
		if n > 0 {
			if werr := d.write((*bp)[:n]); werr != nil {
				return werr
			}
		}
		if err != nil {
			return err
		}
	}
}

// awaitNB waits for the source to become readable: on the runtime's
// poller while the conversation goes on, parked once it has been quiet
// for parkAfter (errParked: the goroutine must return).
func (d *direction) awaitNB() error {
	p := d.sess.srv.parker.Load()
	if p == nil || d.fd < 0 {
		if d.idle > 0 {
			d.src.SetReadDeadline(time.Now().Add(d.idle))
		}
		return d.nb.wait()
	}
	after := d.sess.srv.parkAfter
	if now := mono(); d.armed-now < after/2 {
		// The deadline is (nearly) due while the session is busy: push it
		// out once for the next half of the window.
		d.arm(now + after)
	}
	for {
		err := d.nb.wait()
		if err == nil {
			d.lastData = mono()
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		if mono()-d.lastData < after {
			// Bytes moved since the deadline was armed: not idle yet.
			d.arm(d.lastData + after)
			continue
		}
		if d.srcTLS != nil {
			// Idle for parkAfter: what crypto/tls's reads grew goes back.
			releaseTLSBuffers(d.srcTLS)
		}
		if d.rec != nil {
			d.rec.sleep(d.recSrc) // no AEAD, no buffer while parked
		}
		if p.park(d) {
			return errParked
		}
		d.armed = 0
		d.src.SetReadDeadline(time.Time{})
		return d.nb.wait()
	}
}

// arm sets src's read deadline to t (since monoStart).
func (d *direction) arm(t time.Duration) {
	d.armed = t
	d.src.SetReadDeadline(monoStart.Add(t))
}

// monoStart and mono give a monotonic clock in 8 bytes, where a
// time.Time would take 24 in every direction.
var monoStart = time.Now()

func mono() time.Duration { return time.Since(monoStart) }

// handshakeBy runs tc's handshake within timeout and until ctx is done,
// through raw's deadline. HandshakeContext would do the same with one
// more goroutine per handshake (crypto/tls watches the context in its
// own); context.AfterFunc starts none unless ctx is cancelled.
func handshakeBy(ctx context.Context, tc *tls.Conn, raw net.Conn, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	raw.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	err := tc.Handshake()
	if !stop() && err != nil {
		err = errors.Join(err, ctx.Err()) // cancelled: say so, as HandshakeContext does
	}
	raw.SetDeadline(time.Time{})
	return err
}
