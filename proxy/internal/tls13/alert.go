package tls13

import "strconv"

// Alert is a TLS alert description (RFC 8446, section 6). As an error it
// is the alert to send to the peer before closing.
type Alert uint8

// The alerts this layer sends or looks at.
const (
	alertCloseNotify       Alert = 0
	AlertUnexpectedMessage Alert = 10
	AlertBadRecordMAC      Alert = 20
	AlertRecordOverflow    Alert = 22
	AlertIllegalParameter  Alert = 47
	AlertDecodeError       Alert = 50
	AlertProtocolVersion   Alert = 70
	AlertInternalError     Alert = 80
	alertUserCanceled      Alert = 90
	// CloseNotify is the orderly end of a direction.
	CloseNotify = alertCloseNotify
)

var alertNames = map[Alert]string{
	alertCloseNotify:       "close notify",
	AlertUnexpectedMessage: "unexpected message",
	AlertBadRecordMAC:      "bad record MAC",
	AlertRecordOverflow:    "record overflow",
	AlertIllegalParameter:  "illegal parameter",
	AlertDecodeError:       "error decoding message",
	AlertProtocolVersion:   "protocol version not supported",
	AlertInternalError:     "internal error",
	alertUserCanceled:      "user canceled",
}

func (a Alert) Error() string {
	if s, ok := alertNames[a]; ok {
		return "tls13: " + s
	}
	return "tls13: alert(" + strconv.Itoa(int(a)) + ")"
}

// RemoteAlertError is a fatal alert the peer sent.
type RemoteAlertError struct{ Alert Alert }

func (e *RemoteAlertError) Error() string { return "remote error: " + e.Alert.Error() }

// AlertOf returns the alert to send for an error Open returned, and false
// when none should be sent: the peer's close_notify or its own alert.
func AlertOf(err error) (Alert, bool) {
	a, ok := err.(Alert)
	return a, ok
}
