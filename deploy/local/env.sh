# Sourced by up.sh, down.sh and status.sh: where the local cluster lives
# and which ports it uses. Override any of these in the environment.
#
#   IMAPGATE_LOCAL_DIR        state directory (configs, logs, mail, pids)
#   IMAPGATE_LOCAL_PORT_BASE  every port is this plus a fixed offset
#   IMAPGATE_BIN              imapgate binary (default: built from this checkout)
#   IMAPGATE_CONSUL           consul binary (default: the one install-test-deps.sh built)
#   IMAPGATE_CACHE            as for scripts/install-test-deps.sh

DIR="${IMAPGATE_LOCAL_DIR:-/tmp/imapgate-local}"
BASE="${IMAPGATE_LOCAL_PORT_BASE:-17000}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${IMAPGATE_CACHE:-$HOME/.cache/imapgate}"

CONSUL_HTTP=$((BASE + 500))
CONSUL_DNS=$((BASE + 600))
CONSUL_SERVER=$((BASE + 300))
CONSUL_SERF_LAN=$((BASE + 301))
CONSUL_SERF_WAN=$((BASE + 302))
CONSUL_GRPC=$((BASE + 502))
DOVECOT1_IMAP=$((BASE + 143))
DOVECOT2_IMAP=$((BASE + 144))
IG1_IMAPS=$((BASE + 1993))
IG1_IMAP=$((BASE + 1143))
IG1_HTTP=$((BASE + 1080))
IG2_IMAPS=$((BASE + 2993))
IG2_IMAP=$((BASE + 2143))
IG2_HTTP=$((BASE + 2080))

export CONSUL_HTTP_ADDR="127.0.0.1:$CONSUL_HTTP"

say() { printf '%-12s %s\n' "$1" "$2"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# alive PIDFILE: the process in PIDFILE runs.
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# http_get PORT PATH: prints the status line of GET http://127.0.0.1:PORT/PATH.
# Plain bash, so the scripts need no curl.
http_get() {
	local line
	exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
	printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
	IFS= read -r -t 5 line <&3 || { exec 3<&-; return 1; }
	exec 3<&-
	printf '%s\n' "${line%$'\r'}"
}

# greeting PORT: the IMAP greeting of 127.0.0.1:PORT.
greeting() {
	local line
	exec 3<>"/dev/tcp/127.0.0.1/$1" 2>/dev/null || return 1
	IFS= read -r -t 5 line <&3 || { exec 3<&-; return 1; }
	exec 3<&-
	printf '%s\n' "${line%$'\r'}"
}

# wait_for SECONDS WHAT COMMAND...: retries COMMAND every 0.2 s.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $deadline ] || return 1
		sleep 0.2
	done
}

find_consul() {
	local c
	for c in "${IMAPGATE_CONSUL:-}" "$CACHE/bin/consul-1.13.9" "$(command -v consul || true)"; do
		[ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
	done
	die "consul not found: run scripts/install-test-deps.sh (builds consul 1.13.9 into $CACHE/bin) or set IMAPGATE_CONSUL"
}

find_dovecot() {
	local c
	for c in "$(command -v dovecot || true)" /usr/sbin/dovecot; do
		[ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
	done
	die "dovecot not found: apt-get install dovecot-imapd (or run scripts/install-test-deps.sh)"
}
