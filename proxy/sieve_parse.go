package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strconv"
	"strings"
)

// This file reads ManageSieve (RFC 5804) command lines before login:
// atoms, quoted strings and literals ({n+} as RFC 5804 wants, {n} too),
// bounded in line length, literal size, whole command size and argument
// count. No tags, unlike IMAP.

// sieveArg is one word of a command.
type sieveArg struct {
	val    string
	quoted bool // a string (quoted or literal), not an atom
}

// errSieve is a command the client got wrong; fatal ones end the session.
type errSieve struct {
	text  string
	fatal bool
}

func (e *errSieve) Error() string { return e.text }

var (
	errSieveTooLong = &errSieve{text: "Line too long", fatal: true}
	errSieveNUL     = &errSieve{text: "NUL in command", fatal: true}
	errSieveLiteral = &errSieve{text: "Literal too large", fatal: true}
	errSieveBig     = &errSieve{text: "Command too large", fatal: true}
	errSieveArgs    = &errSieve{text: "Too many arguments", fatal: true}
)

// readSieveCommand reads one command: its words, the first upper-cased
// if it is an atom.
func readSieveCommand(br *bufio.Reader, lim readLimits) ([]sieveArg, error) {
	var args []sieveArg
	total := 0
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, errSieveTooLong
		}
		if err != nil {
			return nil, err
		}
		total += len(line)
		if total > lim.maxCommand {
			return nil, errSieveBig
		}
		line = bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
		if bytes.IndexByte(line, 0) >= 0 {
			return nil, errSieveNUL
		}
		lit, err := parseSieveLine(string(line), &args)
		if err != nil {
			return nil, err
		}
		if len(args) > lim.maxArgs {
			return nil, errSieveArgs
		}
		if lit < 0 {
			if len(args) > 0 && !args[0].quoted {
				// Bytes, not runes: strings.ToUpper would turn each
				// invalid UTF-8 byte into three and let a name past the
				// limits (found by FuzzReadSieveCommand).
				args[0].val = upperASCII(args[0].val)
			}
			return args, nil
		}
		if lit > lim.maxLiteral {
			return nil, errSieveLiteral
		}
		total += lit
		if total > lim.maxCommand {
			return nil, errSieveBig
		}
		buf := make([]byte, lit)
		if _, err := io.ReadFull(br, buf); err != nil {
			return nil, err
		}
		if bytes.IndexByte(buf, 0) >= 0 {
			return nil, errSieveNUL
		}
		args = append(args, sieveArg{val: string(buf), quoted: true})
	}
}

// parseSieveLine appends the words of one line to args. It returns the
// size of a literal announced at its end (-1: none).
func parseSieveLine(line string, args *[]sieveArg) (lit int, err error) {
	i := 0
	for i < len(line) {
		switch c := line[i]; {
		case c == ' ':
			i++
		case c == '"':
			var b strings.Builder
			j := i + 1
			for ; j < len(line); j++ {
				if line[j] == '\\' && j+1 < len(line) && (line[j+1] == '"' || line[j+1] == '\\') {
					b.WriteByte(line[j+1])
					j++
					continue
				}
				if line[j] == '"' {
					break
				}
				b.WriteByte(line[j])
			}
			if j >= len(line) {
				return 0, &errSieve{text: "Unterminated quoted string"}
			}
			*args = append(*args, sieveArg{val: b.String(), quoted: true})
			i = j + 1
		case c == '{':
			end := strings.IndexByte(line[i:], '}')
			if end < 0 || i+end != len(line)-1 {
				return 0, &errSieve{text: "Bad literal"}
			}
			num := strings.TrimSuffix(line[i+1:i+end], "+")
			n, err := strconv.Atoi(num)
			if err != nil || n < 0 || len(num) > 10 {
				return 0, &errSieve{text: "Bad literal size"}
			}
			return n, nil
		default:
			j := i
			for j < len(line) && line[j] != ' ' && line[j] != '"' && line[j] != '{' {
				if line[j] < 0x21 || line[j] == 0x7f {
					return 0, &errSieve{text: "Bad character in command"}
				}
				j++
			}
			*args = append(*args, sieveArg{val: line[i:j]})
			i = j
		}
	}
	return -1, nil
}

// sieveQuote returns s as a ManageSieve quoted string, or a literal when
// it holds CR or LF.
func sieveQuote(s string) string {
	if strings.ContainsAny(s, "\r\n") {
		return "{" + strconv.Itoa(len(s)) + "+}\r\n" + s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// upperASCII upper-cases the ASCII letters of s and leaves every other
// byte as it is, so the result is never longer than s.
func upperASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'a' <= c && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
	}
	return string(b)
}
