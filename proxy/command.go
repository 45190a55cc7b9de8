package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
)

// This file is the pre-auth command reader: it turns the bytes a client
// sends before login into commands, and never holds more than the limits
// allow. It understands just enough IMAP syntax for the Not Authenticated
// state: atoms, quoted strings, literals (synchronising, and LITERAL+ /
// LITERAL-'s non-synchronising "{n+}") and parenthesised lists (for ID).
// Its exact rules (tags, literal syntax, too-long lines) are in syntax.go.

type tokKind uint8

const (
	tokAtom tokKind = iota
	tokQuoted
	tokLiteral
	tokLParen
	tokRParen
)

// token is one argument of a command. Strings (atoms, quoted, literals)
// carry their decoded value.
type token struct {
	kind tokKind
	val  string
}

// isString reports whether t can stand where IMAP's astring is expected.
func (t token) isString() bool {
	return t.kind == tokAtom || t.kind == tokQuoted || t.kind == tokLiteral
}

// isNil reports whether t is the atom NIL.
func (t token) isNil() bool { return t.kind == tokAtom && strings.EqualFold(t.val, "NIL") }

// command is one pre-auth command as read from the client.
type command struct {
	tag  string
	name string // upper case
	args []token
}

// readLimits bound what one command may cost.
type readLimits struct {
	maxLine    int // bytes in one line, CRLF included
	maxLiteral int // bytes in one literal
	maxCommand int // bytes in one command: lines and literals together
	maxArgs    int // tokens in one command
}

// protoError is an error the client is told about. A fatal one ends the
// connection with BYE; otherwise the command gets a tagged BAD (or an
// untagged one when no tag could be read).
type protoError struct {
	tag   string // "" when the tag is unknown
	code  string // response code without brackets, may be empty
	text  string
	fatal bool
}

func (e *protoError) Error() string {
	if e.code != "" {
		return "[" + e.code + "] " + e.text
	}
	return e.text
}

func badf(tag, format string, args ...any) *protoError {
	return &protoError{tag: tag, text: fmt.Sprintf(format, args...)}
}

// errLineTooLong is returned when a line does not fit into maxLine bytes.
var errLineTooLong = &protoError{code: "TOOBIG", text: "Command line too long", fatal: true}

// continuer sends the "+" continuation request for a synchronising literal.
type continuer interface {
	continueLiteral() error
}

// cmdReader reads pre-auth commands from a bounded buffer.
type cmdReader struct {
	br   *bufio.Reader // cmdReaderBuffer bytes
	cont continuer
	lim  readLimits
	acc  []byte // a line longer than br's buffer, gathered
}

// readLine returns the next line without its CRLF (a lone LF is accepted).
// The slice is valid until the next read. A line over the limit is
// skipped to its end and answered as tooLong says.
func (r *cmdReader) readLine() ([]byte, error) { return r.readLineOf("") }

// readLineOf is readLine for a line of the command tagged tag (after a
// literal), or of a new command when tag is "".
func (r *cmdReader) readLineOf(tag string) ([]byte, error) {
	if cap(r.acc) > cmdReaderBuffer {
		r.acc = nil // a long line's memory goes with it
	}
	r.acc = r.acc[:0]
	for {
		chunk, err := r.br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			if len(r.acc)+len(chunk) > r.lim.maxLine {
				head := append(r.acc, chunk...)
				read := len(head)
				head = bytes.Clone(head[:min(len(head), tooLongHead)])
				r.acc = nil
				return nil, r.skipTooLong(head, read, tag, r.lim.maxCommand)
			}
			r.acc = append(r.acc, chunk...)
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(r.acc)+len(chunk) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		line := chunk
		if len(r.acc) > 0 {
			r.acc = append(r.acc, chunk...)
			line = r.acc
		}
		if len(line) > r.lim.maxLine {
			return nil, tooLong(line[:min(len(line), tooLongHead)], line[max(0, len(line)-16):], tag)
		}
		line = line[:len(line)-1]
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		return line, nil
	}
}

// readCommand reads one whole command, literals included. Protocol errors
// come back as *protoError; anything else is a connection error.
func (r *cmdReader) readCommand() (*command, error) {
	var p lineParser
	cmd, err := r.readCommandInto(&p)
	if pe, ok := err.(*protoError); ok && !pe.fatal && endsWithNonSyncLiteral(p.b) {
		// The line is refused, but the client sends the literal anyway:
		// its bytes would be read as commands.
		return nil, &protoError{code: pe.code, text: pe.text, fatal: true}
	}
	return cmd, err
}

func (r *cmdReader) readCommandInto(p *lineParser) (*command, error) {
	line, err := r.readLine()
	if err != nil {
		return nil, err
	}
	total := len(line)
	*p = lineParser{b: line}
	if p.eol() {
		return nil, badf("", "Empty command line")
	}
	tag, ok := p.tag()
	if !ok {
		return nil, badf("", "Invalid tag")
	}
	cmd := &command{tag: tag}
	if !p.sp() {
		return nil, badf(tag, "Missing command")
	}
	name, ok := p.atom()
	if !ok {
		return nil, badf(tag, "Invalid command name")
	}
	cmd.name = strings.ToUpper(name)
	for {
		lit, err := p.args(cmd, r.lim.maxArgs)
		if err != nil {
			return nil, err
		}
		if lit == nil {
			return cmd, nil
		}
		if lit.size > r.lim.maxLiteral || total+lit.size > r.lim.maxCommand {
			if lit.sync {
				// The client waits for our "+": refusing it ends the command.
				return nil, &protoError{tag: tag, code: "TOOBIG", text: "Literal too big"}
			}
			// The literal's bytes are on their way and would be read as
			// commands: the only safe answer is to hang up.
			return nil, &protoError{code: "TOOBIG", text: "Literal too big", fatal: true}
		}
		if lit.sync {
			if err := r.cont.continueLiteral(); err != nil {
				return nil, err
			}
		}
		buf := make([]byte, lit.size)
		if _, err := io.ReadFull(r.br, buf); err != nil {
			return nil, err
		}
		cmd.args = append(cmd.args, token{kind: tokLiteral, val: string(buf)})
		total += lit.size
		p.b, p.i = nil, 0 // its literal was read: it is no longer the line at fault
		if line, err = r.readLineOf(tag); err != nil {
			return nil, err
		}
		if total += len(line); total > r.lim.maxCommand {
			return nil, &protoError{code: "TOOBIG", text: "Command too long", fatal: true}
		}
		p.b, p.i = line, 0
	}
}

// syntaxError is a client's syntax mistake; its text goes into the BAD.
type syntaxError string

func (e syntaxError) Error() string { return string(e) }

// literalSpec is a literal announced at the end of a line.
type literalSpec struct {
	size int
	sync bool
}

// lineParser tokenizes one line of a command.
type lineParser struct {
	b     []byte
	i     int
	depth int // open parentheses, carried across literals
}

func (p *lineParser) eol() bool { return p.i >= len(p.b) }

func (p *lineParser) sp() bool {
	if p.i < len(p.b) && p.b[p.i] == ' ' {
		p.i++
		return true
	}
	return false
}

// isAtomChar reports whether c may appear in an atom. IMAP's atom-specials
// are "(){ %*\"\\]" plus CTL; ']' is allowed since astrings permit it, and
// bytes >= 0x80 are tolerated for UTF-8 user names.
func isAtomChar(c byte) bool {
	switch c {
	case '(', ')', '{', ' ', '%', '*', '"', '\\', 0x7f:
		return false
	}
	return c > 0x1f
}

func (p *lineParser) atom() (string, bool) {
	start := p.i
	for p.i < len(p.b) && isAtomChar(p.b[p.i]) {
		p.i++
	}
	if p.i == start {
		return "", false
	}
	return string(p.b[start:p.i]), true
}

func (p *lineParser) tag() (string, bool) {
	start := p.i
	for p.i < len(p.b) && isTagChar(p.b[p.i]) {
		p.i++
	}
	if p.i == start || (p.i < len(p.b) && p.b[p.i] != ' ') {
		return "", false
	}
	return string(p.b[start:p.i]), true
}

// args reads arguments to the end of the line. It returns a literalSpec
// when the line ends with one; the caller reads the literal and continues
// with the next line, where the same rules apply.
func (p *lineParser) args(cmd *command, maxArgs int) (*literalSpec, error) {
	for !p.eol() {
		// Arguments are separated by one space, except right after "("
		// and right before ")", where a space is tolerated but not needed.
		afterOpen := len(cmd.args) > 0 && cmd.args[len(cmd.args)-1].kind == tokLParen
		if p.sp() {
			if p.eol() {
				return nil, badf(cmd.tag, "Trailing space")
			}
		} else if !afterOpen && p.b[p.i] != ')' {
			return nil, badf(cmd.tag, "Missing space between arguments")
		}
		if len(cmd.args) >= maxArgs {
			return nil, &protoError{tag: cmd.tag, code: "TOOBIG", text: "Too many arguments"}
		}
		switch c := p.b[p.i]; c {
		case '(':
			p.i++
			p.depth++
			cmd.args = append(cmd.args, token{kind: tokLParen})
		case ')':
			if p.depth == 0 {
				return nil, badf(cmd.tag, "Unexpected )")
			}
			p.i++
			p.depth--
			cmd.args = append(cmd.args, token{kind: tokRParen})
		case '"':
			s, err := p.quoted()
			if err != nil {
				return nil, badf(cmd.tag, "%s", err.Error())
			}
			cmd.args = append(cmd.args, token{kind: tokQuoted, val: s})
		case '{':
			lit, err := p.literal()
			if err != nil {
				return nil, badf(cmd.tag, "%s", err.Error())
			}
			if !p.eol() {
				return nil, badf(cmd.tag, "Literal must end the line")
			}
			return lit, nil
		default:
			a, ok := p.atom()
			if !ok {
				return nil, badf(cmd.tag, "Invalid character in argument")
			}
			cmd.args = append(cmd.args, token{kind: tokAtom, val: a})
		}
	}
	if p.depth != 0 {
		return nil, badf(cmd.tag, "Unbalanced parentheses")
	}
	return nil, nil
}

func (p *lineParser) quoted() (string, error) {
	p.i++ // opening quote
	var sb []byte
	start := p.i
	for p.i < len(p.b) {
		switch c := p.b[p.i]; c {
		case '"':
			var s string
			if sb == nil {
				s = string(p.b[start:p.i])
			} else {
				s = string(sb)
			}
			p.i++
			return s, nil
		case '\\':
			if sb == nil {
				sb = append([]byte(nil), p.b[start:p.i]...)
			}
			p.i++
			if p.i >= len(p.b) {
				return "", syntaxError("Unterminated quoted string")
			}
			if e := p.b[p.i]; e != '"' && e != '\\' {
				return "", syntaxError("Invalid escape in quoted string")
			}
			sb = append(sb, p.b[p.i])
		case 0:
			return "", syntaxError("NUL in quoted string")
		default:
			if sb != nil {
				sb = append(sb, c)
			}
		}
		p.i++
	}
	return "", syntaxError("Unterminated quoted string")
}

func (p *lineParser) literal() (*literalSpec, error) {
	end := bytes.IndexByte(p.b[p.i:], '}')
	if end < 0 {
		return nil, syntaxError("Invalid literal")
	}
	size, sync, ok := parseLiteralSpec(p.b[p.i+1 : p.i+end])
	p.i += end + 1
	if !ok {
		return nil, syntaxError("Invalid literal: {digits} or {digits+}")
	}
	return &literalSpec{size: size, sync: sync}, nil
}
