package proxy

import "github.com/imapgate/imapgate/routing"

// Validate reports what NewServer and SetOptions would refuse in o (an
// unknown SASL mechanism, a master login without a verifier, prefix
// lengths out of range), without building a Server. A nil Router is not
// an error here: a configuration is checked before its router exists.
func (o Options) Validate() error {
	if o.Router == nil {
		o.Router = routing.RouterFunc(nil)
	}
	_, err := checkOptions(o)
	return err
}
