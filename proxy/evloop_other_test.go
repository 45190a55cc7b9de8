//go:build !linux

package proxy

// loopParked: no event loops here.
func loopParked(*session) int { return 0 }
