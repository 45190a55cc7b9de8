#!/usr/bin/env bash
# Builds imapgate as users get it and checks that it installs, runs and
# goes away cleanly (called by scripts/test.sh; needs root and dpkg):
#
#  1. the binary as deploy/Dockerfile builds it (static, trimmed) and the
#     image's own check step on deploy/docker/imapgate.toml;
#  2. imapgate_<version>_amd64.deb from deploy/debian/nfpm.yaml (nfpm, as a
#     Go library: deploy/debian/main.go);
#  3. dpkg -i, then what the package promises: files, conffile, system
#     user, state directory, the unit enabled and not started, the man page,
#     `imapgate check` on the installed config and `imapgate version`;
#  4. the installed binary and config, as the package's user, in front of a
#     test Dovecot: a login through it (TestInstalledPackage);
#  5. dpkg --purge, then nothing of it left: no file, directory, user,
#     group or enable link.
#
# Environment: IMAPGATE_VERSION overrides the package version (default
# 0.0.0~gitYYYYMMDD.<commit>); IMAPGATE_PACKAGE_OUT keeps the .deb there.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'package-test: FAIL: %s\n' "$*" >&2; exit 1; }
ok() { printf 'package-test: ok: %s\n' "$*"; }
# dpkg refuses to run while another dpkg or apt holds its lock (a shared
# machine, unattended upgrades): wait for it, up to two minutes.
dpkg_locked() {
	local err i
	for i in $(seq 240); do
		if err=$(dpkg "$@" 2>&1 >/dev/null); then return 0; fi
		grep -q 'lock' <<<"$err" || { printf '%s\n' "$err" >&2; return 1; }
		sleep 0.5
	done
	printf '%s\n' "$err" >&2
	return 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (dpkg -i)"
command -v dpkg >/dev/null || die "needs dpkg"
if dpkg-query -W -f='${Status}' imapgate 2>/dev/null | grep -q 'ok installed'; then
	die "an imapgate package is already installed here; this test would purge it (dpkg --purge imapgate first)"
fi

export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
out="${IMAPGATE_PACKAGE_OUT:-}"
if [ -z "$out" ]; then
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
version="${IMAPGATE_VERSION:-0.0.0~git$(date -u +%Y%m%d).$commit}"

# --- 1. the binary, as the Dockerfile builds it ----------------------------
# If the Dockerfile's build or check step changes, this must change with it.
grep -q 'CGO_ENABLED=0 GOFLAGS=-trimpath go build -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}"' deploy/Dockerfile ||
	die "deploy/Dockerfile no longer builds the way this script does (CGO_ENABLED=0, -trimpath, -s -w, version stamps): update both"
grep -q '/out/imapgate check deploy/docker/imapgate.toml' deploy/Dockerfile ||
	die "deploy/Dockerfile no longer checks deploy/docker/imapgate.toml: update both"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version -X main.commit=$commit" \
	-o "$out/imapgate" ./cmd/imapgate
buildinfo=$(go version -m "$out/imapgate")
grep -q 'CGO_ENABLED=0' <<<"$buildinfo" || die "binary not built with CGO_ENABLED=0"
grep -q -- '-trimpath=true' <<<"$buildinfo" || die "binary not built with -trimpath"
if command -v ldd >/dev/null && ldd "$out/imapgate" 2>&1 | grep -q '=>'; then
	die "binary is dynamically linked"
fi
"$out/imapgate" check deploy/docker/imapgate.toml >/dev/null || die "the image's check step (deploy/docker/imapgate.toml) failed"
ok "static trimmed binary $("$out/imapgate" version); image config checks"

# --- 2. the package ----------------------------------------------------------
deb=$(cd deploy/debian && go run . -binary "$out/imapgate" -version "$version" -out "$out")
[ "$(basename "$deb")" = "imapgate_${version}_amd64.deb" ] || die "unexpected package name $deb"
ok "built $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"

# --- 3. install ----------------------------------------------------------------
purge() { dpkg_locked --purge imapgate 2>/dev/null || true; }
trap 'purge; [ -n "${IMAPGATE_PACKAGE_OUT:-}" ] || rm -rf "$out"' EXIT
dpkg_locked -i "$deb" || die "dpkg -i failed"
for f in /usr/bin/imapgate /etc/imapgate/imapgate.toml /lib/systemd/system/imapgate@.service \
	/usr/share/man/man1/imapgate.1.gz /usr/share/doc/imapgate/examples/imapgate.toml; do
	[ -f "$f" ] || die "$f not installed"
done
dpkg-query -W -f='${Conffiles}\n' imapgate | grep -q '/etc/imapgate/imapgate.toml' || die "imapgate.toml is not a conffile"
getent passwd imapgate >/dev/null || die "no system user imapgate"
[ "$(getent passwd imapgate | cut -d: -f7)" = /usr/sbin/nologin ] || die "user imapgate has a login shell"
[ "$(stat -c %U:%a /var/lib/imapgate)" = imapgate:700 ] || die "/var/lib/imapgate is $(stat -c %U:%a /var/lib/imapgate), want imapgate:700"
[ "$(stat -c %G:%a /etc/imapgate/imapgate.toml)" = imapgate:640 ] || die "imapgate.toml is $(stat -c %G:%a /etc/imapgate/imapgate.toml), want group imapgate, 640"
[ -L /etc/systemd/system/multi-user.target.wants/imapgate@main.service ] || die "imapgate@main.service is not enabled"
grep -q '^ExecStart=/usr/bin/imapgate ' /lib/systemd/system/imapgate@.service || die "the unit does not run /usr/bin/imapgate"
if pgrep -f '^/usr/bin/imapgate' >/dev/null; then die "the installed imapgate is running after install: the package must not start it"; fi
zcat /usr/share/man/man1/imapgate.1.gz | grep -q -- '-config' || die "the man page lacks the flags"
/usr/bin/imapgate check /etc/imapgate/imapgate.toml >/dev/null || die "imapgate check /etc/imapgate/imapgate.toml failed"
/usr/bin/imapgate version | grep -qF "imapgate $version (commit $commit" || die "imapgate version: $(/usr/bin/imapgate version)"
ok "installed: files, conffile, user, state dir, unit enabled not started, man page, check, version"

# --- 4. run it in front of Dovecot -------------------------------------------
IMAPGATE_INSTALLED=/usr/bin/imapgate IMAPGATE_VERSION="$version" \
	go test -count=1 -run '^TestInstalledPackage$' ./cmd/imapgate || die "the installed imapgate does not proxy a login to Dovecot"
ok "installed binary proxies a login to Dovecot as user imapgate"

# --- 5. purge ------------------------------------------------------------------
mapfile -t owned < <(dpkg-query -L imapgate)
dpkg_locked --purge imapgate || die "dpkg --purge failed"
left=()
for f in "${owned[@]}"; do
	# Directories shared with other packages (/etc, /usr/bin) stay.
	if [ -e "$f" ] && { [ ! -d "$f" ] || [[ "$f" == *imapgate* ]]; }; then left+=("$f"); fi
done
for f in /etc/imapgate /var/lib/imapgate /usr/share/doc/imapgate /etc/systemd/system/multi-user.target.wants/imapgate@main.service \
	/var/lib/systemd/deb-systemd-helper-enabled/imapgate@.service.dsh-also \
	/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/imapgate@main.service \
	/var/lib/systemd/deb-systemd-helper-masked/imapgate@.service; do
	[ -e "$f" ] || [ -L "$f" ] && left+=("$f")
done
getent passwd imapgate >/dev/null && left+=("user imapgate")
getent group imapgate >/dev/null && left+=("group imapgate")
dpkg-query -W imapgate >/dev/null 2>&1 && left+=("dpkg still knows the package")
[ ${#left[@]} -eq 0 ] || die "left behind after purge: ${left[*]}"
ok "purged: nothing left behind"
echo "package-test: all passed"
