#!/usr/bin/env bash
# Stops the cluster deploy/local/up.sh started: the imapgates first (they
# drain and deregister from Consul), then the Dovecots, then Consul, each
# waited for. Removes the state directory unless KEEP_STATE=1. Exits 0 if
# nothing is left running.
set -uo pipefail
. "$(dirname "$0")/env.sh"

# stop NAME SIGNAL SECONDS: signal the process in NAME.pid and wait.
stop() {
	local name=$1 sig=$2 secs=$3 pidfile="$DIR/$1.pid" pid
	[ -s "$pidfile" ] || return 0
	pid=$(cat "$pidfile")
	if ! kill -0 "$pid" 2>/dev/null; then
		say "$name" "not running"
		rm -f "$pidfile"
		return 0
	fi
	kill "-$sig" "$pid"
	local deadline=$((SECONDS + secs))
	while kill -0 "$pid" 2>/dev/null; do
		if [ $SECONDS -ge $deadline ]; then
			say "$name" "still running after ${secs}s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null
			sleep 0.5
			break
		fi
		sleep 0.1
	done
	say "$name" "stopped (pid $pid)"
	rm -f "$pidfile"
}

[ -d "$DIR" ] || { say cluster "nothing in $DIR"; exit 0; }
# imapgate drains over shutdown.drain_window + grace (2s + 5s here).
stop imapgate2 TERM 15 &
stop imapgate1 TERM 15 &
wait
stop dovecot2 TERM 15
stop dovecot1 TERM 15
# SIGINT makes the dev agent leave gracefully.
stop consul INT 20

left=0
for f in "$DIR"/*.pid; do
	[ -e "$f" ] || continue
	alive "$f" && left=1 && say "$(basename "$f" .pid)" "STILL RUNNING (pid $(cat "$f"))"
done
[ $left = 0 ] || exit 1
if [ "${KEEP_STATE:-}" = 1 ]; then
	say state "kept in $DIR"
else
	rm -rf "$DIR"
	say state "removed $DIR"
fi
