package bench

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Proc is a process on this machine whose CPU time and memory a scenario
// measures: the proxy under test.
type Proc struct {
	PID int
}

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat.
// Linux fixes it at 100 for user space on every architecture Go runs on.
const clockTicks = 100

// CPU returns the user plus system CPU time the process has used, all its
// threads included, with 10 ms resolution.
func (p Proc) CPU() (time.Duration, error) {
	user, sys, err := p.Times()
	return user + sys, err
}

// Times returns the user and the system CPU time the process has used, all
// its threads included, with 10 ms resolution. System time is the kernel's
// work for it: system calls, and on loopback much of the TCP work of both
// ends of its connections.
func (p Proc) Times() (user, sys time.Duration, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID))
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces;
	// fields are counted after its closing parenthesis.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: no command name", p.PID)
	}
	f := strings.Fields(string(b[i+1:]))
	// After ")": state(3) ppid(4) ... utime(14) stime(15), so index 11 and 12.
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", p.PID, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", p.PID, f[11], f[12])
	}
	return time.Duration(ut) * time.Second / clockTicks, time.Duration(st) * time.Second / clockTicks, nil
}

// RSS returns the process's resident set size in bytes (VmRSS).
func (p Proc) RSS() (int64, error) {
	return p.status("VmRSS:")
}

// status reads a "kB" line of /proc/PID/status.
func (p Proc) status(key string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, err
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", p.PID, key)
}

// FDs returns how many file descriptors the process has open.
func (p Proc) FDs() (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.PID))
	return len(ents), err
}

// selfCPU is this process's own CPU time, for context beside the proxy's.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
