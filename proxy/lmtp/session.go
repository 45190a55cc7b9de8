package lmtp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"github.com/imapgate/imapgate/proxy/internal/addr"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/imapgate/imapgate/routing"
	"go.uber.org/zap"
)

// This file is one MTA connection's transactions: RCPT routed and relayed
// at once, the message fanned out to the backends, one reply per
// recipient after the final dot.

// session is one MTA connection (go-smtp's Session).
type session struct {
	srv  *Server
	conn *smtp.Conn
	cl   client
	id   string
	log  *zap.Logger

	from     string
	mailOpts *smtp.MailOptions
	rcpts    []*rcpt               // accepted (by their backend), in RCPT order
	txs      map[string]*backendTx // by backend ID
	txOrder  []*backendTx
	idle     map[string]*backendTx // healthy connections kept from earlier transactions

	tracked *trackedConn // the accepted connection, under any TLS

	mu     sync.Mutex // guards busy and closed, for Shutdown
	busy   bool       // between MAIL and the end of the transaction
	closed bool
}

// rcpt is one accepted recipient.
type rcpt struct {
	to   string
	user string // the routing key
	opts *smtp.RcptOptions
	tx   *backendTx
	fail *smtp.SMTPError // set when it must get this reply whatever happens
}

var _ smtp.LMTPSession = (*session)(nil)

func (s *Server) newSession(c *smtp.Conn) (smtp.Session, error) {
	if strings.ContainsFunc(c.Hostname(), func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		return nil, errBadHelo
	}
	sess := &session{
		srv:  s,
		conn: c,
		cl:   client{remote: addr.Of(c.Conn().RemoteAddr()), helo: c.Hostname()},
		txs:  make(map[string]*backendTx),
		idle: make(map[string]*backendTx),
	}
	sess.id = newID()
	sess.log = s.log.With(zap.String("lmtp_session", sess.id), zap.String("client", sess.cl.remote.String()))
	sess.tracked = tracked(c.Conn())
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutting {
		return nil, errShutdown
	}
	if _, ok := s.conns[sess.tracked]; ok {
		s.conns[sess.tracked] = sess
	}
	return sess, nil
}

// closeIfIdle ends the connection with 421 unless a transaction is
// under way (then Reset does it after the replies).
func (s *session) closeIfIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.busy || s.closed {
		return
	}
	s.closeLocked()
}

func (s *session) closeLocked() {
	s.closed = true
	c := s.conn.Conn()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	c.Write([]byte("421 4.3.2 Service shutting down, try again later\r\n"))
	c.Close() // go-smtp's loop sees it and logs the session out
}

// Mail starts a transaction; backends get their MAIL with their first
// recipient.
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errShutdown
	}
	s.busy = true
	s.from, s.mailOpts = from, opts
	return nil
}

// routingUser is the name a recipient is routed by.
func (s *session) routingUser(to string) string {
	u := to
	if d := s.srv.o.RecipientDelimiter; d != "" {
		local, domain, hasAt := strings.Cut(u, "@")
		if i := strings.Index(local, d); i > 0 {
			local = local[:i]
		}
		u = local
		if hasAt {
			u += "@" + domain
		}
	}
	return routing.NormalizeUser(u)
}

// Rcpt routes a recipient and relays it to its backend; the backend's
// answer is the MTA's.
func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	backend, err := s.rcpt(to, opts)
	var se *smtp.SMTPError
	errors.As(err, &se)
	s.srv.o.Metrics.Recipient(backend, "rcpt", result(se))
	return err
}

// rcpt is Rcpt; it also returns the backend's ID, for metrics.
func (s *session) rcpt(to string, opts *smtp.RcptOptions) (string, error) {
	user := s.routingUser(to)
	ctx, cancel := context.WithTimeout(s.srv.base, s.srv.o.Timeouts.Backend)
	defer cancel()
	log := s.log.With(zap.String("rcpt", to))
	r := s.srv.o.Router
	b, err := r.Route(ctx, user)
	if err != nil {
		log.Warn("recipient deferred: no route", zap.Error(err))
		return "", errNoRoute
	}
	tx, err := s.tx(ctx, b)
	if err != nil {
		return b.ID, err
	}
	if err := tx.c.Rcpt(to, opts); err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			// The backend's own refusal (unknown user: 550; over quota:
			// 452...) keeps its code. Nothing is committed.
			log.Info("recipient refused by backend", zap.String("backend", b.ID), zap.Int("code", se.Code), zap.String("reply", se.Message))
			return b.ID, se
		}
		tx.err = err
		log.Warn("recipient deferred: backend failed", zap.String("backend", b.ID), zap.Error(err))
		return b.ID, errBackendFail
	}
	rc := &rcpt{to: to, user: user, opts: opts, tx: tx}
	if cm, ok := r.(routing.Committer); ok {
		got, err := cm.Commit(ctx, user, b)
		switch {
		case err != nil:
			log.Warn("recipient deferred: placement not recorded", zap.String("backend", b.ID), zap.Error(err))
			return b.ID, s.unrcpt(tx, errNoRoute)
		case got.ID != b.ID:
			log.Info("recipient deferred: placed on another backend meanwhile", zap.String("backend", b.ID), zap.String("placed", got.ID))
			return b.ID, s.unrcpt(tx, errMoving)
		}
	}
	tx.rcpts = append(tx.rcpts, rc)
	s.rcpts = append(s.rcpts, rc)
	return b.ID, nil
}

// tx returns the transaction on b, starting it (dial, MAIL) if needed.
func (s *session) tx(ctx context.Context, b *routing.Backend) (*backendTx, error) {
	if tx := s.txs[b.ID]; tx != nil {
		if tx.err != nil {
			return nil, errBackendFail
		}
		return tx, nil
	}
	if tx := s.reuse(b); tx != nil {
		return tx, nil
	}
	tx, err := s.srv.dial(ctx, b, s.cl)
	if err == nil {
		if err = tx.c.Mail(s.from, s.mailOpts); err != nil {
			tx.close(false)
		}
	}
	if err != nil {
		var se *smtp.SMTPError
		switch {
		case errors.Is(err, errLoop):
			s.log.Error("mail loop: the backend's LMTP service is an imapgate", zap.String("backend", b.ID), zap.String("addr", b.LMTPAddr))
			err = errSelfLoop
		case errors.As(err, &se) && se.Code >= 400:
			// MAIL refused (a sender the backend rejects): its own reply,
			// for this backend's recipients only.
			s.log.Info("sender refused by backend", zap.String("backend", b.ID), zap.Int("code", se.Code))
			err = se
		case errors.Is(err, errNoLMTP):
			s.log.Error("backend has no LMTP address", zap.String("backend", b.ID))
		default:
			s.log.Warn("backend unavailable for delivery", zap.String("backend", b.ID), zap.String("addr", b.LMTPAddr), zap.Error(err))
			err = errBackendDown
		}
		// Not remembered: the next recipient on b tries again.
		return nil, err
	}
	tx.open = true
	s.txs[b.ID] = tx
	s.txOrder = append(s.txOrder, tx)
	return tx, nil
}

// reuse starts the transaction on b on a connection kept from an
// earlier transaction of this MTA connection (the same backend, with the
// same XCLIENT), or returns nil. Any failure closes it: the caller dials.
func (s *session) reuse(b *routing.Backend) *backendTx {
	tx := s.idle[b.ID]
	if tx == nil {
		return nil
	}
	delete(s.idle, b.ID)
	if tx.b != b && (tx.b.LMTPAddr != b.LMTPAddr || tx.b.LMTPSecurity != b.LMTPSecurity) {
		tx.close(true)
		return nil
	}
	tx.rcpts, tx.dataC, tx.b = nil, nil, b
	if err := tx.c.Mail(s.from, s.mailOpts); err != nil {
		tx.close(false)
		return nil
	}
	tx.open = true
	s.txs[b.ID] = tx
	s.txOrder = append(s.txOrder, tx)
	return tx
}

// unrcpt takes back a recipient the backend already accepted (its
// placement went elsewhere): the backend transaction is reset and
// replayed with the others, and the MTA gets fail for this one.
func (s *session) unrcpt(tx *backendTx, fail *smtp.SMTPError) error {
	err := tx.c.Reset()
	if err == nil {
		err = tx.c.Mail(s.from, s.mailOpts)
	}
	for _, rc := range tx.rcpts {
		if err != nil {
			break
		}
		if rerr := tx.c.Rcpt(rc.to, rc.opts); rerr != nil {
			var se *smtp.SMTPError
			if !errors.As(rerr, &se) {
				err = rerr
				break
			}
			// It was accepted a moment ago: whatever changed, the MTA
			// tries again later.
			rc.fail = errBackendFail
		}
	}
	if err != nil {
		tx.err = err
		s.log.Warn("backend failed while replaying a transaction", zap.String("backend", tx.b.ID), zap.Error(err))
	}
	return fail
}

// Data is the SMTP variant; LMTP always calls LMTPData.
func (s *session) Data(r io.Reader) error {
	return errors.New("lmtp: Data called on an LMTP session")
}

// LMTPData streams the message to every backend with recipients and
// reports each recipient's reply.
func (s *session) LMTPData(r io.Reader, status smtp.StatusCollector) error {
	start := time.Now()
	results := make([]*smtp.SMTPError, len(s.rcpts))
	defer func() {
		for i, rc := range s.rcpts {
			status.SetStatus(rc.to, results[i])
		}
	}()
	raw := s.conn.Conn()
	deadline := func() { raw.SetReadDeadline(time.Now().Add(s.srv.o.Timeouts.Command)) }
	deadline()
	br := bufio.NewReaderSize(r, 32<<10)
	head, hops, err := readHeader(br, maxHeader)
	if err != nil {
		s.log.Warn("message header not received whole", zap.Error(err))
		s.setAll(results, readFailure(err))
		return nil
	}
	if hops >= s.srv.o.HopLimit {
		s.log.Warn("message refused: too many hops", zap.Int("received", hops))
		s.setAll(results, errHops)
		io.Copy(io.Discard, br)
		return nil
	}

	// DATA on every backend with live recipients, in parallel.
	var live []*backendTx
	for _, tx := range s.txOrder {
		if tx.err == nil && len(tx.rcpts) > 0 {
			live = append(live, tx)
		}
	}
	s.parallel(live, func(tx *backendTx) {
		tx.conn.SetDeadline(time.Now().Add(s.srv.o.Timeouts.Backend))
		dc, err := tx.c.Data()
		tx.conn.SetDeadline(time.Time{})
		if err != nil {
			tx.err = err
			return
		}
		tx.dataC = dc
	})

	received := s.received(start)
	first := append([]byte(received), head...)
	buf := make([]byte, 32<<10)
	chunk := first
	var rerr error
	for {
		if len(chunk) > 0 {
			s.parallel(s.writable(), func(tx *backendTx) {
				tx.conn.SetWriteDeadline(time.Now().Add(s.srv.o.Timeouts.Backend))
				if _, err := tx.dataC.Write(chunk); err != nil {
					tx.err = err
				}
			})
		}
		if rerr != nil {
			break
		}
		deadline()
		n, err := br.Read(buf)
		chunk, rerr = buf[:n], err
		if errors.Is(rerr, io.EOF) && n == 0 {
			break
		}
	}
	if rerr != nil && !errors.Is(rerr, io.EOF) {
		// The MTA's side failed (too large, timeout, gone): no backend
		// gets the final dot, so none delivers.
		s.log.Warn("message not received whole; delivered nowhere", zap.Error(rerr))
		for _, tx := range s.writable() {
			tx.err = rerr
			tx.close(false)
		}
		s.setAll(results, readFailure(rerr))
		return nil
	}

	// A recipient that moved while the message came in must not get it
	// on the old backend: its whole backend transaction is dropped.
	ctx, cancel := context.WithTimeout(s.srv.base, s.srv.o.Timeouts.Backend)
	defer cancel()
	s.parallel(s.writable(), func(tx *backendTx) {
		for _, rc := range tx.rcpts {
			if b, err := s.srv.o.Router.Route(ctx, rc.user); err != nil || b.ID != tx.b.ID {
				tx.err = errMoving
				tx.close(false)
				return
			}
		}
	})

	// The final dot, and each backend's replies.
	replies := make(map[*backendTx]map[string]*smtp.SMTPError)
	var mu sync.Mutex
	s.parallel(s.writable(), func(tx *backendTx) {
		tx.conn.SetDeadline(time.Now().Add(s.srv.o.Timeouts.Backend))
		resp, err := tx.dataC.CloseWithLMTPResponse()
		tx.dataC = nil
		tx.open = false
		got := make(map[string]*smtp.SMTPError)
		for to, dr := range resp {
			got[to] = okReply(dr.StatusText)
		}
		var lerr smtp.LMTPDataError
		if errors.As(err, &lerr) {
			for to, se := range lerr {
				got[to] = &smtp.SMTPError{Code: se.Code, EnhancedCode: se.EnhancedCode, Message: stripRcpt(se.Message)}
			}
		} else if err != nil {
			tx.err = err
		}
		mu.Lock()
		replies[tx] = got
		mu.Unlock()
	})

	delivered, deferred := 0, 0
	for i, rc := range s.rcpts {
		var res *smtp.SMTPError
		switch {
		case rc.fail != nil:
			res = rc.fail
		default:
			if got := replies[rc.tx][rc.to]; got != nil {
				res = got
			} else if errors.Is(rc.tx.err, errMoving) {
				res = errMoving
			} else {
				// No reply for it: the backend failed before answering.
				res = errBackendFail
			}
		}
		if res.Code/100 == 2 {
			delivered++
		} else {
			deferred++
		}
		s.srv.o.Metrics.Recipient(rc.tx.b.ID, "data", result(res))
		results[i] = res
	}
	for _, tx := range s.txOrder {
		if tx.err != nil && !errors.Is(tx.err, errMoving) {
			s.log.Warn("backend failed during delivery", zap.String("backend", tx.b.ID), zap.Error(tx.err))
		}
	}
	s.log.Info("delivery", zap.Int("recipients", len(s.rcpts)), zap.Int("backends", len(live)),
		zap.Int("ok", delivered), zap.Int("not_ok", deferred), zap.Duration("took", time.Since(start)))
	return nil
}

// writable returns the backend transactions still taking the message.
func (s *session) writable() []*backendTx {
	var out []*backendTx
	for _, tx := range s.txOrder {
		if tx.err == nil && tx.dataC != nil {
			out = append(out, tx)
		}
	}
	return out
}

// parallel runs f for every transaction at once and waits.
func (s *session) parallel(txs []*backendTx, f func(*backendTx)) {
	if len(txs) == 1 {
		f(txs[0])
		return
	}
	var wg sync.WaitGroup
	for _, tx := range txs {
		wg.Go(func() { f(tx) })
	}
	wg.Wait()
}

func (s *session) setAll(results []*smtp.SMTPError, e *smtp.SMTPError) {
	for i := range results {
		results[i] = e
	}
}

// readFailure is the reply when the message could not be read whole.
func readFailure(err error) *smtp.SMTPError {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se // go-smtp's own: 552 for a message over SIZE
	}
	if errors.Is(err, smtp.ErrTooLongLine) {
		// Not SMTP (RFC 5321 4.5.3.1.6): it would fail again. go-smtp
		// closes the connection after the replies.
		return errLongLine
	}
	return reply(451, smtp.EnhancedCode{4, 3, 0}, "Message not received whole, try again")
}

// received is imapgate's trace header field (RFC 5321 4.4).
func (s *session) received(t time.Time) string {
	var b strings.Builder
	b.WriteString("Received: from ")
	helo := s.cl.helo
	if helo == "" {
		helo = "unknown"
	}
	fmt.Fprintf(&b, "%s ([%s])\r\n\tby %s (imapgate) with LMTP id %s", sanitize(helo), s.cl.remote.Addr(), s.srv.o.Hostname, s.id)
	if len(s.rcpts) == 1 {
		fmt.Fprintf(&b, "\r\n\tfor <%s>", sanitize(s.rcpts[0].to))
	}
	b.WriteString("; " + t.Format(time.RFC1123Z) + "\r\n")
	return b.String()
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x21 || r == 0x7f || r == '(' || r == ')' || r == '<' || r == '>' {
			return '_'
		}
		return r
	}, s)
}

// okReply turns a backend's 250 text into the reply given to the MTA.
func okReply(text string) *smtp.SMTPError {
	enh := smtp.EnhancedCode{2, 0, 0}
	if code, rest, ok := strings.Cut(text, " "); ok {
		var a, b, c int
		if n, _ := fmt.Sscanf(code, "%d.%d.%d", &a, &b, &c); n == 3 && a == 2 {
			enh, text = smtp.EnhancedCode{a, b, c}, rest
		}
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: enh, Message: stripRcpt(text)}
}

// stripRcpt drops the "<rcpt> " a backend starts its per-recipient reply
// with: go-smtp adds it again.
func stripRcpt(msg string) string {
	if strings.HasPrefix(msg, "<") {
		if i := strings.Index(msg, "> "); i > 0 {
			return msg[i+2:]
		}
	}
	return msg
}

// Reset ends the transaction. Healthy backend connections are kept for
// the MTA's next transaction (RSET if one was left open); the others are
// closed (a transaction that did not reach its final dot is delivered
// nowhere).
func (s *session) Reset() {
	for _, tx := range s.txOrder {
		if tx.err != nil || tx.dataC != nil || s.isClosing() {
			tx.close(tx.err == nil && tx.dataC == nil)
			continue
		}
		if tx.open {
			if err := tx.c.Reset(); err != nil {
				tx.close(false)
				continue
			}
			tx.open = false
		}
		s.idle[tx.b.ID] = tx
	}
	s.txs = make(map[string]*backendTx)
	s.txOrder, s.rcpts, s.from, s.mailOpts = nil, nil, "", nil
	s.mu.Lock()
	s.busy = false
	s.srv.mu.Lock()
	shutting := s.srv.shutting
	s.srv.mu.Unlock()
	if shutting && !s.closed {
		// The transaction's replies are written: a draining server
		// closes the connection now.
		s.closeLocked()
	}
	s.mu.Unlock()
}

// isClosing reports whether the server is draining.
func (s *session) isClosing() bool {
	s.srv.mu.Lock()
	defer s.srv.mu.Unlock()
	return s.srv.shutting
}

// Logout frees the session.
func (s *session) Logout() error {
	s.Reset()
	for id, tx := range s.idle {
		tx.close(true)
		delete(s.idle, id)
	}
	return nil
}

// tracked finds the trackedConn under c.
func tracked(c net.Conn) *trackedConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	t, _ := c.(*trackedConn)
	return t
}

// maxHeader bounds how much of the header section is read (to count
// Received fields) before the message is streamed.
const maxHeader = 64 << 10

// readHeader reads the header section (up to limit bytes, ending at the
// blank line) and counts its Received fields.
func readHeader(br *bufio.Reader, limit int) (head []byte, received int, err error) {
	var buf bytes.Buffer
	lineStart := true
	for buf.Len() < limit {
		line, err := br.ReadSlice('\n')
		buf.Write(line)
		start := lineStart
		if start && len(line) >= 9 && strings.EqualFold(string(line[:9]), "received:") {
			received++
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			lineStart = false
			continue
		}
		lineStart = true
		if err != nil {
			if errors.Is(err, io.EOF) {
				return buf.Bytes(), received, nil
			}
			return nil, 0, err
		}
		if start && len(bytes.TrimRight(line, "\r\n")) == 0 {
			break
		}
	}
	return buf.Bytes(), received, nil
}
