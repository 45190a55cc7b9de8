#!/usr/bin/env bash
# Starts an imapgate cluster on this machine, without containers:
#
#   a Consul dev agent, two Dovecots registered in it as service "imap"
#   with TCP health checks, the same four users on both (each user's INBOX
#   holds a message saying which backend it is on), and two imapgate
#   instances on loopback ports with the Consul router, registered as
#   service "imapgate".
#
# Everything lives in $IMAPGATE_LOCAL_DIR (default /tmp/imapgate-local) and
# listens on 127.0.0.1 only; see env.sh for the ports and what to override.
# deploy/local/down.sh stops it all. Needs dovecot (apt-get install
# dovecot-imapd) and consul 1.13.9 (scripts/install-test-deps.sh builds it).
set -euo pipefail
. "$(dirname "$0")/env.sh"

CONSUL=$(find_consul)
DOVECOT=$(find_dovecot)
if alive "$DIR/consul.pid" || alive "$DIR/imapgate1.pid"; then
	die "a local cluster already runs in $DIR; deploy/local/down.sh first"
fi
mkdir -p "$DIR"
chmod 755 "$DIR" # Dovecot's unprivileged processes must traverse it
p="$DIR"
while [ "$(id -u)" -eq 0 ] && [ "$p" != / ]; do
	p=$(dirname "$p")
	case "$(stat -c %A "$p")" in
	*x | *t) ;;
	*) die "$p is not traversable by others (mode $(stat -c %a "$p")): Dovecot's auth process cannot reach its files under $DIR; choose another IMAPGATE_LOCAL_DIR" ;;
	esac
done

IG="${IMAPGATE_BIN:-}"
if [ -z "$IG" ]; then
	IG="$DIR/bin/imapgate"
	say build "go build -o $IG ./cmd/imapgate"
	(cd "$REPO" && CGO_ENABLED=0 go build -o "$IG" ./cmd/imapgate)
fi
[ -x "$IG" ] || die "imapgate binary $IG is not executable"

USERS=(
	"alice@example.org:alicepass"
	"bob@example.org:bobpass"
	"carol@example.net:carolpass"
	"dave@example.net:davepass"
)

# --- Dovecot -----------------------------------------------------------------

# Dovecot refuses to serve mail as root: as root the mail belongs to
# nobody and Dovecot's own processes use the accounts its package made;
# otherwise everything runs as the current user ("rootless").
if [ "$(id -u)" -eq 0 ]; then
	MAIL_UID=$(id -u nobody) MAIL_GID=$(id -g nobody)
	INTERNAL_USER=dovecot LOGIN_USER=dovenull INTERNAL_GROUP=dovecot ROOTLESS=
else
	MAIL_UID=$(id -u) MAIL_GID=$(id -g)
	INTERNAL_USER=$(id -un) LOGIN_USER=$(id -un) INTERNAL_GROUP=$(id -gn) ROOTLESS=1
fi

start_dovecot() {
	local name=$1 port=$2 d="$DIR/$1"
	rm -rf "$d"
	mkdir -p "$d/mail"
	chmod 755 "$d"
	: >"$d/users"
	local u user pass home
	for u in "${USERS[@]}"; do
		user=${u%%:*} pass=${u#*:}
		home="$d/mail/$user"
		mkdir -p "$home/Maildir/new" "$home/Maildir/cur" "$home/Maildir/tmp"
		# The marker: which backend this user's mail is on.
		printf 'From: imapgate-local <root@localhost>\r\nTo: %s\r\nSubject: You are on %s\r\nDate: %s\r\n\r\nThis mailbox lives on backend %s.\r\n' \
			"$user" "$name" "$(date -R)" "$name" >"$home/Maildir/new/1.$name.local"
		echo "$user:{PLAIN}$pass:$MAIL_UID:$MAIL_GID::$home::" >>"$d/users"
	done
	chown -R "$MAIL_UID:$MAIL_GID" "$d/mail"
	chmod 640 "$d/users"
	[ -n "$ROOTLESS" ] || chgrp "$INTERNAL_GROUP" "$d/users"
	{
		echo "# imapgate deploy/local: backend $name"
		echo "base_dir = $d/run"
		echo "state_dir = $d/state"
		echo "instance_name = imapgate-local-$name-$BASE"
		echo "log_path = $d/dovecot.log"
		echo "protocols = imap"
		echo "listen = 127.0.0.1"
		echo "ssl = no"
		echo "default_internal_user = $INTERNAL_USER"
		echo "default_internal_group = $INTERNAL_GROUP"
		echo "default_login_user = $LOGIN_USER"
		echo "first_valid_uid = $((MAIL_UID < 500 ? MAIL_UID : 500))"
		echo "first_valid_gid = $((MAIL_GID < 1 ? MAIL_GID : 1))"
		echo "auth_verbose = yes"
		echo "imap_id_log = *"
		echo "auth_mechanisms = plain login"
		# imapgate forwards the client's address in ID; trust it from here.
		echo "login_trusted_networks = 127.0.0.0/8"
		echo "passdb {"
		echo "  driver = passwd-file"
		echo "  args = $d/users"
		echo "}"
		echo "userdb {"
		echo "  driver = passwd-file"
		echo "  args = $d/users"
		echo "}"
		echo "mail_location = maildir:~/Maildir"
		echo "mail_max_userip_connections = 1000"
		echo "service imap-login {"
		echo "  inet_listener imap {"
		echo "    port = $port"
		echo "  }"
		echo "  inet_listener imaps {"
		echo "    port = 0"
		echo "  }"
		[ -z "$ROOTLESS" ] || echo "  chroot ="
		echo "}"
		if [ -n "$ROOTLESS" ]; then
			echo "service anvil {"
			echo "  chroot ="
			echo "}"
		fi
	} >"$d/dovecot.conf"
	"$DOVECOT" -F -c "$d/dovecot.conf" >"$d/stderr.log" 2>&1 </dev/null &
	echo $! >"$DIR/$name.pid"
	wait_for 15 "$name" greeting "$port" || die "$name did not start; see $d/stderr.log and $d/dovecot.log"
	say "$name" "imap://127.0.0.1:$port (pid $(cat "$DIR/$name.pid"))"
}

# --- Consul ------------------------------------------------------------------

mkdir -p "$DIR/consul.d"
# The backends as Consul services, with the health check that decides
# whether imapgate routes to them. Same shape as deploy/consul/*.json.
for n in 1 2; do
	port_var=DOVECOT${n}_IMAP
	cat >"$DIR/consul.d/dovecot$n.json" <<JSON
{
  "service": {
    "id": "dovecot$n",
    "name": "imap",
    "address": "127.0.0.1",
    "port": ${!port_var},
    "tags": ["dovecot", "local"],
    "meta": {
      "imapgate-weight": "1",
      "imapgate-security": "none"
    },
    "checks": [
      {
        "id": "dovecot$n-imap",
        "name": "IMAP port answers",
        "tcp": "127.0.0.1:${!port_var}",
        "interval": "2s",
        "timeout": "1s"
      }
    ]
  }
}
JSON
done
cat >"$DIR/consul.d/agent.json" <<JSON
{
  "disable_update_check": true,
  "limits": { "http_max_conns_per_client": 10000 }
}
JSON

"$CONSUL" agent -dev -node "imapgate-local-$BASE" -bind 127.0.0.1 -client 127.0.0.1 \
	-http-port "$CONSUL_HTTP" -dns-port "$CONSUL_DNS" -server-port "$CONSUL_SERVER" \
	-serf-lan-port "$CONSUL_SERF_LAN" -serf-wan-port "$CONSUL_SERF_WAN" -grpc-port "$CONSUL_GRPC" \
	-config-dir "$DIR/consul.d" >"$DIR/consul.log" 2>&1 </dev/null &
echo $! >"$DIR/consul.pid"
wait_for 60 consul "$CONSUL" catalog nodes || die "consul did not start; see $DIR/consul.log"
say consul "http://$CONSUL_HTTP_ADDR (pid $(cat "$DIR/consul.pid"), dev agent, state in memory)"

start_dovecot dovecot1 "$DOVECOT1_IMAP"
start_dovecot dovecot2 "$DOVECOT2_IMAP"

# Seed one operator pin (flag 1 = pinned), as in the README's data model.
"$CONSUL" kv put -flags=1 imapgate/users/dave@example.net dovecot2 >/dev/null

# Wait until Consul's checks pass for both backends, so imapgate starts
# with both routable.
passing() { [ "$(passing_backends)" = 2 ]; }
passing_backends() {
	exec 4<>"/dev/tcp/127.0.0.1/$CONSUL_HTTP" || return 1
	printf 'GET /v1/health/service/imap?passing=1 HTTP/1.0\r\n\r\n' >&4
	grep -o '"ID": *"dovecot[12]"' <&4 | sort -u | wc -l
	exec 4<&-
}
wait_for 30 checks passing || die "the backends' Consul checks do not pass; see $DIR/consul.log"

# --- imapgate ----------------------------------------------------------------

start_imapgate() {
	local n=$1 imaps=$2 imap=$3 http=$4 conf="$DIR/imapgate$1.toml"
	cat >"$conf" <<TOML
# imapgate deploy/local: instance $n. See deploy/imapgate.toml for every key.
[log]
level = "info"
format = "json"

[[listen]]
addr = "127.0.0.1:$imaps"
mode = "tls"
name = "imaps"

[[listen]]
addr = "127.0.0.1:$imap"
mode = "starttls"
name = "imap"

[tls]
self_signed_names = ["localhost"]

[limits]
auth_failure_delay = "200ms"

[routing]
router = "consul"

[consul]
address = "$CONSUL_HTTP_ADDR"
service = "imap"
prefix = "imapgate"
grace = "5s"

[consul.register]
enable = true
name = "imapgate"
id = "imapgate$n"
address = "127.0.0.1"
tags = ["local"]

[http]
addr = "127.0.0.1:$http"

[shutdown]
drain_window = "2s"
grace = "5s"
TOML
	"$IG" -config "$conf" >"$DIR/imapgate$n.log" 2>&1 </dev/null &
	echo $! >"$DIR/imapgate$n.pid"
	ready() { [ "$(http_get "$http" /readyz)" = "HTTP/1.0 200 OK" ] || [ "$(http_get "$http" /readyz)" = "HTTP/1.1 200 OK" ]; }
	wait_for 30 "imapgate$n" ready || die "imapgate$n did not become ready; see $DIR/imapgate$n.log"
	say "imapgate$n" "imaps://127.0.0.1:$imaps imap://127.0.0.1:$imap (STARTTLS) http://127.0.0.1:$http (pid $(cat "$DIR/imapgate$n.pid"))"
}

start_imapgate 1 "$IG1_IMAPS" "$IG1_IMAP" "$IG1_HTTP"
start_imapgate 2 "$IG2_IMAPS" "$IG2_IMAP" "$IG2_HTTP"

cat <<TXT

Local cluster up in $DIR (logs: *.log there).
Users (password): alice@example.org (alicepass), bob@example.org (bobpass),
carol@example.net (carolpass), dave@example.net (davepass, pinned to dovecot2).
Each INBOX has a message "You are on dovecotN" telling which backend served it.

  openssl s_client -quiet -connect 127.0.0.1:$IG1_IMAPS      # then: a LOGIN alice@example.org alicepass
  $IG ctl -addr 127.0.0.1:$IG1_HTTP backends
  $IG ctl -addr 127.0.0.1:$IG1_HTTP move alice@example.org dovecot2
  CONSUL_HTTP_ADDR=$CONSUL_HTTP_ADDR $CONSUL kv get -recurse imapgate/
  deploy/local/status.sh; deploy/local/down.sh
TXT
