package config

import (
	"strings"
	"testing"
)

func TestOverrides(t *testing.T) {
	c := SingleBackend("127.0.0.1:143", "starttls", "")
	if len(c.Listen) != 2 || c.Listen[0].Mode != "tls" || c.Listen[1].Addr != "[::]:143" {
		t.Fatalf("single-backend listeners %+v", c.Listen)
	}
	o := Overrides{ListenStartTLS: " 127.0.0.1:1143 ,127.0.0.1:2143", Cert: "c.pem", Key: "k.pem", LogLevel: "debug", LogFormat: "json", HTTPAddr: "off"}
	if err := o.Apply(c); err != nil {
		t.Fatal(err)
	}
	if len(c.Listen) != 2 || c.Listen[0].Addr != "127.0.0.1:1143" || c.Listen[0].Mode != "starttls" || c.Listen[1].Addr != "127.0.0.1:2143" {
		t.Errorf("listeners %+v", c.Listen)
	}
	if c.TLS.Certificates[0] != (CertFile{Cert: "c.pem", Key: "k.pem"}) || c.Log.Level != "debug" || c.Log.Format != LogJSON || c.HTTP.ListenAddr() != "" {
		t.Errorf("overrides not applied: %+v %+v %+v", c.TLS, c.Log, c.HTTP)
	}
	if err := (Overrides{}).Apply(c); err != nil || len(c.Listen) != 2 || c.Log.Level != "debug" {
		t.Errorf("the zero Overrides changed something: %v %+v", err, c)
	}
	if err := (Overrides{LogFormat: "xml"}).Apply(c); err == nil || !strings.Contains(err.Error(), "-log-format") {
		t.Errorf("bad -log-format: %v", err)
	}
}
