package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// This file holds the pre-auth reader's grammar rules where the RFCs are
// exact, and the recovery from a line that is too long.
//
//	tag     = 1*<any ASTRING-CHAR except "+">           (RFC 3501, 9)
//	literal = "{" number ["+"] "}" CRLF *CHAR8          (RFC 3501; "+" RFC 7888)
//
// Both are 7-bit. Anything else inside braces is a BAD at once: no
// continuation is sent, no bytes are waited for.

// isTagChar reports whether c may appear in a tag: a 7-bit ASTRING-CHAR
// (ATOM-CHAR or "]") other than "+".
func isTagChar(c byte) bool {
	switch c {
	case '(', ')', '{', ' ', '%', '*', '"', '\\', '+':
		return false
	}
	return c > 0x20 && c < 0x7f
}

// maxLiteralDigits bounds a literal's size field: RFC 3501's number is
// at most 4,294,967,295, ten digits.
const maxLiteralDigits = 10

// parseLiteralSpec parses what is between a literal's braces: digits,
// optionally followed by "+" (non-synchronising, RFC 7888's LITERAL+ and
// LITERAL- share this syntax).
func parseLiteralSpec(spec []byte) (size int, sync, ok bool) {
	sync = true
	if n := len(spec); n > 0 && spec[n-1] == '+' {
		sync, spec = false, spec[:n-1]
	}
	if len(spec) == 0 || len(spec) > maxLiteralDigits {
		return 0, false, false
	}
	for _, c := range spec {
		if c < '0' || c > '9' {
			return 0, false, false
		}
		size = size*10 + int(c-'0')
	}
	if size > 1<<32-1 {
		return 0, false, false
	}
	return size, sync, true
}

// cmdReaderBuffer is the size of the pre-auth reader's buffer. Lines
// longer than it (up to the line limit) are gathered in cmdReader.acc,
// so a session only holds a long line's memory while it reads one.
const cmdReaderBuffer = 4 << 10

// tooLongHead is how much of a too-long line is kept to find its tag.
const tooLongHead = 256

// skipTooLong discards the rest of a line that passed the line limit
// (head is its beginning, up to tooLongHead bytes; read bytes were read
// of it so far) and returns the error to answer it with (tooLong).
// Discarding is bounded: a "line" longer than maxSkip without a line end
// ends the session.
func (r *cmdReader) skipTooLong(head []byte, read int, tag string, maxSkip int) error {
	var tail []byte // the line's last bytes, for a literal announcement
	skipped := read
	for {
		chunk, err := r.br.ReadSlice('\n')
		skipped += len(chunk)
		if len(chunk) >= 16 {
			tail = append(tail[:0], chunk[len(chunk)-16:]...)
		} else {
			tail = append(tail, chunk...)
			tail = tail[max(0, len(tail)-16):]
		}
		if skipped > maxSkip {
			return errLineTooLong
		}
		if err == nil {
			return tooLong(head, tail, tag)
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if errors.Is(err, io.EOF) {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
}

// tooLong is the answer to a line over the limit that began with head and
// ended with tail (its line end included): a tagged BAD [TOOBIG] when the
// line has a valid tag (or continues the command tagged tag), so the client stays in step (the line is gone),
// or the fatal errLineTooLong when it has none, or when it announced a
// non-synchronising literal, whose bytes follow and would be read as
// commands.
func tooLong(head, tail []byte, tag string) error {
	if endsWithNonSyncLiteral(bytes.TrimRight(tail, "\r\n")) {
		return errLineTooLong
	}
	if tag == "" {
		p := lineParser{b: head}
		var ok bool
		if tag, ok = p.tag(); !ok {
			return errLineTooLong
		}
	}
	return &protoError{tag: tag, code: "TOOBIG", text: "Command line too long"}
}

// endsWithNonSyncLiteral reports whether line (without its line end)
// announces a non-synchronising literal: its bytes follow at once, so a
// refused line cannot be resynchronised at the next line end.
func endsWithNonSyncLiteral(line []byte) bool {
	i := bytes.LastIndexByte(line, '{')
	if i < 0 || !bytes.HasSuffix(line, []byte("+}")) {
		return false
	}
	_, sync, ok := parseLiteralSpec(line[i+1 : len(line)-1])
	return ok && !sync
}
