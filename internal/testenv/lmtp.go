package testenv

import (
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// This file is the MTA side of LMTP conversations, for the LMTP front
// end's tests.

// LMTPDial connects an LMTP client from the given local address (""
// means any).
func LMTPDial(t testing.TB, addr, from string) *smtp.Client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := smtp.NewClientLMTP(conn)
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("mta.test"); err != nil {
		t.Fatal(err)
	}
	return c
}

// Deliver runs one transaction and returns each recipient's RCPT error
// and its reply after the final dot (nil: 250).
func Deliver(t testing.TB, c *smtp.Client, body io.Reader, rcpts ...string) (rcptErr map[string]error, dataErr map[string]*smtp.SMTPError) {
	t.Helper()
	if err := c.Mail("sender@example.com", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	rcptErr = make(map[string]error)
	accepted := 0
	for _, r := range rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			rcptErr[r] = err
		} else {
			accepted++
		}
	}
	dataErr = make(map[string]*smtp.SMTPError)
	if accepted == 0 {
		c.Reset()
		return rcptErr, dataErr
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	if _, err := io.Copy(w, body); err != nil {
		t.Fatalf("writing the message: %v", err)
	}
	_, err = w.CloseWithLMTPResponse()
	var le smtp.LMTPDataError
	if errors.As(err, &le) {
		for r, se := range le {
			dataErr[r] = se
		}
	} else if err != nil {
		t.Fatalf("end of DATA: %v", err)
	}
	return rcptErr, dataErr
}

// Message is a small message with subject (its Message-ID made of it)
// and body.
func Message(subject string, body string) string {
	return "From: sender@example.com\r\nTo: someone@example.org\r\nSubject: " + subject +
		"\r\nMessage-ID: <" + strings.ReplaceAll(subject, " ", "-") + "@test>\r\n\r\n" + body + "\r\n"
}
