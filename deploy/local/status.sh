#!/usr/bin/env bash
# Shows what deploy/local/up.sh started: processes, ports, health, and the
# backends as imapgate1 sees them.
set -uo pipefail
. "$(dirname "$0")/env.sh"

[ -d "$DIR" ] || { say cluster "not running (no $DIR)"; exit 1; }
status=0
show() {
	local name=$1 what=$2
	if alive "$DIR/$name.pid"; then
		say "$name" "up   pid $(cat "$DIR/$name.pid")  $what"
	else
		say "$name" "DOWN $what"
		status=1
	fi
}
show consul "http://$CONSUL_HTTP_ADDR"
show dovecot1 "imap://127.0.0.1:$DOVECOT1_IMAP"
show dovecot2 "imap://127.0.0.1:$DOVECOT2_IMAP"
show imapgate1 "imaps :$IG1_IMAPS  imap :$IG1_IMAP  http :$IG1_HTTP  readyz: $(http_get "$IG1_HTTP" /readyz 2>/dev/null || echo -)"
show imapgate2 "imaps :$IG2_IMAPS  imap :$IG2_IMAP  http :$IG2_HTTP  readyz: $(http_get "$IG2_HTTP" /readyz 2>/dev/null || echo -)"
IG="${IMAPGATE_BIN:-$DIR/bin/imapgate}"
if [ -x "$IG" ] && alive "$DIR/imapgate1.pid"; then
	echo
	"$IG" ctl -addr "127.0.0.1:$IG1_HTTP" backends
fi
exit $status
