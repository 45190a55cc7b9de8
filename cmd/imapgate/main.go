// Command imapgate is an IMAP reverse proxy and load balancer: it
// terminates TLS, answers the Not Authenticated state itself, finds each
// user's backend, logs in there with the client's credentials and splices
// the rest of the session through.
//
// Usage:
//
//	imapgate                          run the embedded demo (no config needed)
//	imapgate -config FILE             run with a configuration file
//	imapgate -backend HOST:PORT ...   run in front of one backend, flags only
//	imapgate check FILE               validate a configuration and exit
//	imapgate -check-config FILE       the same
//	imapgate version                  print version, commit and Go version
//	imapgate -version                 the same
//
// See the README for the configuration file and the flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/imapgate/imapgate/internal/config"
	"github.com/imapgate/imapgate/internal/ctl"
	"go.uber.org/zap"
)

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

// flags are the command-line overrides; a configuration file is for
// everything else.
type flags struct {
	config          string
	checkConfig     string
	demo            bool
	listenTLS       string
	listenStartTLS  string
	backend         string
	backendSecurity string
	backendCA       string
	cert, key       string
	logLevel        string
	logFormat       string
	httpAddr        string
	version         bool
}

func parseFlags(args []string, stderr io.Writer) (*flags, error) {
	var f flags
	fs := flag.NewFlagSet("imapgate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.config, "config", "", "configuration `file` (TOML)")
	fs.StringVar(&f.checkConfig, "check-config", "", "validate this configuration `file` and exit")
	fs.BoolVar(&f.demo, "demo", false, "run the embedded demo: two in-process backends and demo users")
	fs.StringVar(&f.listenTLS, "listen-tls", "", "implicit-TLS listener `addr`esses, comma-separated (e.g. [::]:993)")
	fs.StringVar(&f.listenStartTLS, "listen-starttls", "", "cleartext+STARTTLS listener `addr`esses, comma-separated (e.g. [::]:143)")
	fs.StringVar(&f.backend, "backend", "", "a single backend `host:port` for every user (no config file needed)")
	fs.StringVar(&f.backendSecurity, "backend-security", "none", "how to talk to -backend: none, tls or starttls")
	fs.StringVar(&f.backendCA, "backend-ca", "", "PEM `file` of CAs trusted for the backend's certificate")
	fs.StringVar(&f.cert, "cert", "", "certificate PEM `file` for the listeners")
	fs.StringVar(&f.key, "key", "", "private key PEM `file` for -cert")
	fs.StringVar(&f.logLevel, "log-level", "", "debug, info, warn or error (overrides the file)")
	fs.StringVar(&f.logFormat, "log-format", "", "auto, json or console (overrides the file)")
	fs.BoolVar(&f.version, "version", false, "print the version, commit and Go version and exit")
	fs.StringVar(&f.httpAddr, "http", "", "metrics/health/admin listener `addr`ess, or \"off\" (overrides the file)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: imapgate [flags]\n       imapgate check FILE\n       imapgate ctl COMMAND ...\n       imapgate version\n\nWith no config file and no -backend, imapgate runs the embedded demo.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	return &f, nil
}

func realMain(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "check":
			if len(args) != 2 {
				fmt.Fprintln(stderr, "usage: imapgate check FILE")
				return 2
			}
			return check(args[1], stdout, stderr)
		case "ctl":
			return ctl.Main(args[1:], stdout, stderr)
		case "version":
			return printVersion(stdout)
		}
	}
	f, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "imapgate:", err)
		return 2
	}
	if f.version {
		return printVersion(stdout)
	}
	if f.checkConfig != "" {
		return check(f.checkConfig, stdout, stderr)
	}
	cfg, demo, err := f.load()
	if err != nil {
		fmt.Fprintln(stderr, "imapgate:", err)
		return 2
	}
	log, level, err := newLogger(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "imapgate:", err)
		return 2
	}
	defer log.Sync()
	if err := run(context.Background(), cfg, f, demo, log, level); err != nil {
		log.Error("imapgate stopped", zap.Error(err))
		return 1
	}
	return 0
}

// check validates a configuration file without starting anything.
func check(path string, stdout, stderr io.Writer) int {
	cfg, err := config.Load(path)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		fmt.Fprintf(stderr, "%s: invalid:\n%v\n", path, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: OK\n", path)
	return 0
}

// load builds the configuration from the file and the flags. With neither
// a file nor -backend it is the embedded demo.
func (f *flags) load() (cfg *config.Config, demo bool, err error) {
	switch {
	case f.config != "":
		if f.demo {
			return nil, false, errors.New("-demo and -config exclude each other")
		}
		if cfg, err = config.Load(f.config); err != nil {
			return nil, false, err
		}
	case f.backend != "":
		cfg = config.SingleBackend(f.backend, f.backendSecurity, f.backendCA)
	default:
		cfg, err = config.Parse(demoConfig)
		if err != nil {
			return nil, false, err
		}
		demo = true
	}
	o := config.Overrides{ListenTLS: f.listenTLS, ListenStartTLS: f.listenStartTLS, Cert: f.cert, Key: f.key,
		LogLevel: f.logLevel, LogFormat: f.logFormat, HTTPAddr: f.httpAddr}
	if err := o.Apply(cfg); err != nil {
		return nil, false, err
	}
	if demo {
		// The demo's backends are filled in when they start.
		return cfg, true, nil
	}
	return cfg, false, cfg.Validate()
}
