package logging

import (
	"sync/atomic"
	"time"

	"go.uber.org/zap/zapcore"
)

// isoLayout is zapcore.ISO8601TimeEncoder's layout.
const isoLayout = "2006-01-02T15:04:05.000Z0700"

// isoClock encodes times as zapcore.ISO8601TimeEncoder does, formatting
// the date, the time to the second and the zone once a second instead of
// on every line: at a few hundred logins a second, every session line
// formatted the same second again, and with the caches cold after a TLS
// handshake that was a microsecond and a half a line.
type isoClock struct {
	last atomic.Pointer[isoSecond]
}

// isoSecond is one second's formatted parts, in one location.
type isoSecond struct {
	unix   int64
	loc    *time.Location
	prefix [len("2006-01-02T15:04:05")]byte
	zone   []byte // "Z" or "+hhmm"
}

func (c *isoClock) encode(t time.Time, enc zapcore.PrimitiveArrayEncoder) {
	s := c.last.Load()
	if s == nil || s.unix != t.Unix() || s.loc != t.Location() {
		s = newISOSecond(t)
		c.last.Store(s)
	}
	var b [len(isoLayout)]byte
	n := copy(b[:], s.prefix[:])
	ms := t.Nanosecond() / int(time.Millisecond)
	b[n] = '.'
	b[n+1] = byte('0' + ms/100)
	b[n+2] = byte('0' + ms/10%10)
	b[n+3] = byte('0' + ms%10)
	n += 4
	n += copy(b[n:], s.zone)
	enc.AppendByteString(b[:n])
}

func newISOSecond(t time.Time) *isoSecond {
	f := t.Format(isoLayout)
	s := &isoSecond{unix: t.Unix(), loc: t.Location(), zone: []byte(f[len("2006-01-02T15:04:05.000"):])}
	copy(s.prefix[:], f)
	return s
}
