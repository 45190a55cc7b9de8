#!/usr/bin/env bash
# Installs what imapgate's integration tests and benchmarks run against:
# Dovecot and HAProxy from Debian, Consul and Pebble built from source with
# the Go toolchain. Safe to run again: what is already there is only checked,
# so a warm run takes a few seconds.
#
# Runs as root on Debian 12 without a terminal (CI=true, no stdin).
# Built binaries go to ${IMAPGATE_CACHE:-$HOME/.cache/imapgate}/bin, where
# internal/testenv looks for them; nothing is exported.
set -euo pipefail

CONSUL_VERSION=1.13.9
PEBBLE_VERSION=v2.10.3
APT_PACKAGES=(dovecot-imapd dovecot-core haproxy openssl ca-certificates procps slapd ldap-utils chromium
	dovecot-pop3d dovecot-lmtpd dovecot-managesieved postfix swaks fetchmail sieve-connect python3 nginx libnginx-mod-mail)

CACHE="${IMAPGATE_CACHE:-$HOME/.cache/imapgate}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

export DEBIAN_FRONTEND=noninteractive
# A module that wants a newer Go than this machine's must fail here with a
# clear message, not fetch a toolchain behind our back. An explicit
# GOTOOLCHAIN (say, once go.mod needs a newer Go) is respected.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

# Whatever a step leaves to remove if the script stops half-way.
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT

say() { printf '%-22s %s\n' "$1:" "$2"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(($(date +%s) - $1))s"; }

if [ "$(id -u)" -ne 0 ] && ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
	die "Debian packages are missing and installing them needs root; run as root or: sudo apt-get install ${APT_PACKAGES[*]}"
fi

# --- Debian packages --------------------------------------------------------

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
	installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	t0=$(date +%s)
	# Keep the packages' maintainer scripts from starting system services:
	# tests run their own Dovecot on random ports and must never meet a
	# system one on 143/993. Exit code 101 means "action forbidden".
	policy=/usr/sbin/policy-rc.d
	own_policy=
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		own_policy=1
		cleanup+=("$policy")
	fi
	apt-get update -q >/dev/null
	apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >/tmp/imapgate-apt.log 2>&1 ||
		{ cat /tmp/imapgate-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
	if [ -n "$own_policy" ]; then
		rm -f "$policy"
		own_policy=
	fi
	say apt "installed ${missing[*]} in $(elapsed "$t0")"
fi
for p in dovecot haproxy openssl ps slapd chromium nginx; do
	path=$(command -v "$p" || { [ -x "/usr/sbin/$p" ] && echo "/usr/sbin/$p"; } || true)
	[ -n "$path" ] || die "$p not found after installing ${APT_PACKAGES[*]}"
	how=found
	for m in "${missing[@]}"; do
		case "$m" in "$p" | "$p"-*) how=installed ;; esac
	done
	say "$p" "$how $path"
done

# The packages enable their system services. Stop and disable them whatever
# the init system (or none: containers have neither systemd nor sysvinit
# running), so nothing listens on 143/993 and nothing comes back at boot.
stop_service() {
	local svc=$1 pidfile=$2
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
		systemctl disable --now "$svc.service" "$svc.socket" >/dev/null 2>&1 || true
	else
		if [ -x "/etc/init.d/$svc" ]; then
			"/etc/init.d/$svc" stop >/dev/null 2>&1 || true
		fi
		if command -v update-rc.d >/dev/null 2>&1; then
			update-rc.d "$svc" disable >/dev/null 2>&1 || true
		fi
	fi
	# Last resort for a master started some other way: its pid file. Only
	# the system instance writes there; test instances use their own dirs.
	if [ -f "$pidfile" ]; then
		local pid
		pid=$(cat "$pidfile" 2>/dev/null || true)
		if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && grep -qx "$svc" "/proc/$pid/comm"; then
			kill "$pid" 2>/dev/null || true
			for _ in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
			kill -9 "$pid" 2>/dev/null || true
		fi
	fi
}
stop_service dovecot /run/dovecot/master.pid
stop_service haproxy /run/haproxy.pid
stop_service slapd /run/slapd/slapd.pid
# Tests start their own Postfix with its own config and queue directory.
stop_service postfix /var/spool/postfix/pid/master.pid
stop_service nginx /run/nginx.pid
if command -v ss >/dev/null 2>&1 && ss -Htln 'sport = :143 or sport = :993' | grep -q .; then
	warn "something still listens on port 143 or 993 (not needed by the tests, but check: ss -tlnp)"
fi

# --- kernel limits ----------------------------------------------------------

# Every Dovecot imap process and every Consul watch uses inotify; Debian's
# default of 128 instances per user runs out with a few hundred test
# sessions.
raise_sysctl() {
	local key=$1 want=$2 have
	have=$(sysctl -n "$key" 2>/dev/null || echo 0)
	if [ "$have" -ge "$want" ]; then
		say "$key" "found $have"
	elif sysctl -q -w "$key=$want" >/dev/null 2>&1; then
		say "$key" "raised $have -> $want"
	else
		warn "could not raise $key from $have to $want (not permitted here); tests with many sessions may fail"
	fi
}
raise_sysctl fs.inotify.max_user_instances 8192
raise_sysctl fs.inotify.max_user_watches 524288

# --- Go-built binaries ------------------------------------------------------

command -v go >/dev/null 2>&1 || die "go is not on PATH; it is needed to build Consul and Pebble"

# Consul has no Debian package; build the MPL-licensed v1.13.9 from source.
# About six minutes on two cores, so the result is cached, and a lock keeps
# two concurrent runs (say, two checkouts) from building it twice.
consul="$BIN/consul-$CONSUL_VERSION"
exec 9>"$CACHE/.consul.lock"
flock 9
if "$consul" version >/dev/null 2>&1; then
	say consul "found $consul"
else
	t0=$(date +%s)
	echo "consul: building v$CONSUL_VERSION from source (takes about 6 minutes on 2 cores)..."
	work=$(mktemp -d)
	cleanup+=("$work" "$consul.tmp.$$")
	(
		cd "$work"
		go mod init consulbuild >/dev/null 2>&1
		# consul's own replace directives do not apply to a dependency, so
		# go get resolves its api and sdk modules to the versions it requires.
		go get "github.com/hashicorp/consul@v$CONSUL_VERSION" >get.log 2>&1 ||
			{ cat get.log >&2; exit 1; }
		# Build to a temporary name: a killed build must not leave a
		# half-written binary where the next run would find it.
		CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$consul.tmp.$$" github.com/hashicorp/consul
	) || { rm -f "$consul.tmp.$$"; die "building consul v$CONSUL_VERSION failed"; }
	mv -f "$consul.tmp.$$" "$consul"
	"$consul" version >/dev/null || die "the consul binary just built does not run"
	rm -rf "$work"
	say consul "built $consul in $(elapsed "$t0")"
fi
flock -u 9

# Pebble (Let's Encrypt's test ACME server) and its challenge test server,
# for the ACME tests. Rebuilt when the cached ones are another version.
# modversion prints the main module version a Go binary was built from.
modversion() { go version -m "$1" 2>/dev/null | awk '$1 == "mod" { print $3; exit }'; }
if [ "$(modversion "$BIN/pebble")" = "$PEBBLE_VERSION" ] &&
	[ "$(modversion "$BIN/pebble-challtestsrv")" = "$PEBBLE_VERSION" ]; then
	say pebble "found $BIN/pebble $PEBBLE_VERSION"
	say pebble-challtestsrv "found $BIN/pebble-challtestsrv $PEBBLE_VERSION"
else
	t0=$(date +%s)
	gobin=$(mktemp -d)
	cleanup+=("$gobin")
	if ! GOBIN="$gobin" go install \
		"github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION" \
		"github.com/letsencrypt/pebble/v2/cmd/pebble-challtestsrv@$PEBBLE_VERSION"; then
		rm -rf "$gobin"
		die "go install pebble@$PEBBLE_VERSION failed with $(go version) (if it says it needs a newer Go, pick an older Pebble in $0)"
	fi
	mv -f "$gobin/pebble" "$gobin/pebble-challtestsrv" "$BIN/"
	rm -rf "$gobin"
	say pebble "built $BIN/pebble $PEBBLE_VERSION in $(elapsed "$t0")"
	say pebble-challtestsrv "built $BIN/pebble-challtestsrv $PEBBLE_VERSION"
fi

# staticcheck, which scripts/test.sh runs over the tree so that findings
# fail CI. Rebuilt when the cached one is another version.
STATICCHECK_VERSION=v0.8.2
if [ "$(modversion "$BIN/staticcheck")" = "$STATICCHECK_VERSION" ]; then
	say staticcheck "found $BIN/staticcheck $STATICCHECK_VERSION"
else
	t0=$(date +%s)
	gobin=$(mktemp -d)
	cleanup+=("$gobin")
	GOBIN="$gobin" go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION" ||
		die "go install staticcheck@$STATICCHECK_VERSION failed with $(go version)"
	mv -f "$gobin/staticcheck" "$BIN/"
	say staticcheck "built $BIN/staticcheck $STATICCHECK_VERSION in $(elapsed "$t0")"
fi
