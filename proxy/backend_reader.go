package proxy

import (
	"bufio"
	"io"
	"sync"
)

// The backend leg's reader is needed only until the splice starts (a few
// lines: greeting, the login's answer), but a whole response line of
// maxBackendLine must fit in it. Allocating and zeroing 16 KiB for every
// login was the largest single allocation of a login (about 60% of its
// bytes in bench/profile's allocation profile, and the GC work and
// madvise that come with them); the readers are reused instead. A reader
// is put back only once nothing refers to its buffer: loginOn copies the
// bytes after the tagged OK (backendLogin.pending) before it returns.
var backendReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, backendReadBuffer) }}

// getBackendReader returns a reader of backendReadBuffer bytes on r.
func getBackendReader(r io.Reader) *bufio.Reader {
	br := backendReaders.Get().(*bufio.Reader)
	br.Reset(r)
	return br
}

// putBackendReader gives br back; its buffered bytes are dropped.
func putBackendReader(br *bufio.Reader) {
	br.Reset(nil)
	backendReaders.Put(br)
}
