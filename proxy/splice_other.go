//go:build !linux

package proxy

import "syscall"

const canSplice = false

// waitReadable is not available here: directions keep a buffer while they
// wait, as io.Copy would.
func waitReadable(rc syscall.RawConn) (int, error) { return 1, nil }

// peekQueued cannot peek here: report bytes so that directions read
// (and block in Read) as io.Copy would.
func peekQueued(rc syscall.RawConn, count bool) (int, error) { return 1, nil }

// parker is Linux only.
type parker struct{}

func newParker() (*parker, error)      { return nil, nil }
func (p *parker) park(*direction) bool { return false }
func (p *parker) forget(*direction)    {}
func (p *parker) stop()                {}
