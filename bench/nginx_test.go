package bench

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/imapgate/imapgate/internal/testenv"
)

// nginxMailModule is where Debian's libnginx-mod-mail puts the module.
const nginxMailModule = "/usr/lib/nginx/modules/ngx_mail_module.so"

// haveNginxMail reports whether nginx and its mail module are installed.
func haveNginxMail() bool {
	_, err := os.Stat(nginxMailModule)
	return testenv.Bin("nginx") != "" && err == nil
}

// nginxConfig is nginx's mail proxy as an IMAP anchor: it terminates TLS,
// reads the client's LOGIN itself, asks auth_http where the user goes
// (always Dovecot's cleartext port) and then relays both ways, as
// imapgate does. One process (master_process off), no access log.
func nginxConfig(dir, listen, authURL, cert, key string) string {
	return fmt.Sprintf(`load_module %s;
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log %s/nginx-error.log error;
pid %s/nginx.pid;
events { worker_connections 19900; }
mail {
    server_name localhost;
    auth_http %s;
    proxy on;
    proxy_pass_error_message on;
    ssl_certificate %s;
    ssl_certificate_key %s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:MAIL:10m;
    imap_capabilities "IMAP4rev1" "LITERAL+" "SASL-IR" "ID" "IDLE";
    imap_auth plain login;
    server {
        listen %s ssl;
        protocol imap;
    }
}
`, nginxMailModule, dir, dir, authURL, cert, key, listen)
}

// startNginx starts nginx's mail proxy with an auth_http endpoint in this
// process that sends every user to Dovecot's cleartext port.
func startNginx(t *testing.T, dir string, d *testenv.Dovecot) *server {
	t.Helper()
	host, port, err := net.SplitHostPort(d.Addr)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Auth-Status", "OK")
		w.Header().Set("Auth-Server", host)
		w.Header().Set("Auth-Port", port)
	})}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	ndir := filepath.Join(dir, "nginx")
	if err := os.MkdirAll(ndir, 0o755); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(ndir, "nginx.conf")
	body := nginxConfig(ndir, addr, "http://"+ln.Addr().String()+"/auth", d.CA.ServerCertFile, d.CA.ServerKeyFile)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return startServer(t, "nginx", addr, filepath.Join(ndir, "nginx.log"), d.CA, testenv.Bin("nginx"), "-p", ndir, "-c", conf, "-e", filepath.Join(ndir, "nginx-error.log"))
}
