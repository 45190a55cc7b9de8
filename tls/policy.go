package tls

import (
	stdtls "crypto/tls"
	"fmt"
	"slices"
)

// policy is the parsed TLS policy of a Config.
type policy struct {
	minVersion   uint16
	cipherSuites []uint16 // nil: Go's defaults
}

func parsePolicy(minVersion string, suites []string) (policy, error) {
	var p policy
	switch minVersion {
	case "", "1.2":
		p.minVersion = stdtls.VersionTLS12
	case "1.3":
		p.minVersion = stdtls.VersionTLS13
	default:
		return p, fmt.Errorf("tls: min version %q: want \"1.2\" or \"1.3\"", minVersion)
	}
	for _, name := range suites {
		id, err := cipherSuiteID(name)
		if err != nil {
			return p, err
		}
		p.cipherSuites = append(p.cipherSuites, id)
	}
	return p, nil
}

// cipherSuiteID resolves a TLS 1.2 cipher suite name among the suites Go
// considers secure.
func cipherSuiteID(name string) (uint16, error) {
	for _, cs := range stdtls.CipherSuites() {
		if cs.Name != name {
			continue
		}
		if !slices.Contains(cs.SupportedVersions, stdtls.VersionTLS12) {
			return 0, fmt.Errorf("tls: cipher suite %s is TLS 1.3 only; TLS 1.3 suites are not configurable", name)
		}
		return cs.ID, nil
	}
	for _, cs := range stdtls.InsecureCipherSuites() {
		if cs.Name == name {
			return 0, fmt.Errorf("tls: cipher suite %s is insecure and not allowed", name)
		}
	}
	return 0, fmt.Errorf("tls: unknown cipher suite %q", name)
}
