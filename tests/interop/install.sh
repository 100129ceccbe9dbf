#!/usr/bin/env bash
# Installs the real mail servers and tools the interop suite (tests/interop/) talks to, from
# Debian's packages. Idempotent: a second run installs nothing and takes a second.
#
# - postfix (sendmail, postfix, smtp-sink), swaks with Net::SSLeay, dnsmasq-base: installed
#   normally. A policy-rc.d keeps apt from starting the system Postfix on port 25: the tests run
#   private instances only.
# - Exim and OpenSMTPD cannot be installed beside Postfix (all three provide
#   mail-transport-agent, so installing one removes the others). Their packages are downloaded
#   and unpacked with `dpkg -x` under $RELAY_INTEROP_ROOT (default /opt/relay-interop); the tests
#   run those binaries with private configs. What their maintainer scripts would have done that
#   the binaries need is done here: the system users they run as (Debian-exim, opensmtpd,
#   opensmtpq), OpenSMTPD's chroot directory, and empty mount points for OpenSMTPD's compiled-in
#   spool and helper directories, which each test bind-mounts in a private mount namespace.
#
# Needs root (or sudo). Run from anywhere: bash tests/interop/install.sh
set -euo pipefail

root=${RELAY_INTEROP_ROOT:-/opt/relay-interop}
# libnet-ssleay-perl is only a Recommends of swaks, which --no-install-recommends skips; without
# it swaks exits with "TLS not available" and the STARTTLS scenarios cannot run.
# chromium renders the /status page in tests/interop/test_status_page.py; dovecot-imapd serves
# the rescue mailboxes in tests/interop/test_rescue_imap.py; rspamd is the content filter of
# tests/interop/test_rspamd.py (the policy-rc.d below keeps its system service from starting:
# the test runs a private instance on a loopback high port). strace counts both sides' fsyncs
# in the benchmark (bench/run.py), which uses this suite's Postfix too.
packages=(postfix swaks libnet-ssleay-perl dnsmasq-base chromium rspamd dovecot-imapd strace)
# Exim's and OpenSMTPD's shared libraries (their packages' Depends, less the MTA packages).
libraries=(libdb5.3 libevent-2.1-7 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libnsl2
    libpcre2-8-0 libssl3 libcrypt1 zlib1g libpam0g)
unpacked=(exim4-base exim4-daemon-light opensmtpd)

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "need root to run: $*" >&2
        return 1
    fi
}

apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q)
updated=
apt_update() {
    if [ -z "$updated" ]; then
        as_root "${apt[@]}" update
        updated=1
    fi
}

missing_packages() {
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed$' \
            || echo "$package"
    done
}

if [ -n "${CI:-}" ]; then
    apt_update
fi

mapfile -t wanted < <(missing_packages "${packages[@]}" "${libraries[@]}")
if [ "${#wanted[@]}" -gt 0 ]; then
    apt_update
    # Answer Postfix's configuration question with "No configuration" and forbid starting services
    # while installing: nothing may listen on port 25 because of us.
    echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
    policy=/usr/sbin/policy-rc.d
    added_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        added_policy=1
    fi
    status=0
    as_root "${apt[@]}" install -y --no-install-recommends "${wanted[@]}" || status=$?
    if [ -n "$added_policy" ]; then
        as_root rm -f "$policy"
    fi
    [ "$status" = 0 ] || exit "$status"
fi

# Exim and OpenSMTPD, unpacked. A stamp names the versions unpacked, so a new Debian version
# (security update) is picked up and an unchanged one is not downloaded again.
versions=""
for package in "${unpacked[@]}"; do
    version=$(apt-cache policy "$package" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        apt_update
        version=$(apt-cache policy "$package" | sed -n 's/^ *Candidate: //p')
    fi
    versions+="$package=$version "
done
if [ "$(cat "$root/.versions" 2>/dev/null)" != "$versions" ]; then
    downloads=$(mktemp -d)
    trap 'rm -rf "$downloads"' EXIT
    chmod 755 "$downloads"
    as_root chown _apt "$downloads" 2>/dev/null || true  # apt downloads as the _apt user
    (cd "$downloads" && as_root "${apt[@]}" download "${unpacked[@]}")
    as_root rm -rf "$root.new"
    for deb in "$downloads"/*.deb; do
        as_root dpkg -x "$deb" "$root.new"
    done
    echo "$versions" | as_root tee "$root.new/.versions" >/dev/null
    as_root rm -rf "$root"
    as_root mv "$root.new" "$root"
fi

add_user() {
    getent passwd "$1" >/dev/null || as_root useradd --system --user-group --no-create-home \
        --home-dir "$2" --shell /usr/sbin/nologin "$1"
}
add_user Debian-exim /var/spool/exim4
add_user opensmtpd /var/lib/opensmtpd
add_user opensmtpq /var/lib/opensmtpd
as_root mkdir -p /var/lib/opensmtpd/empty /var/spool/smtpd /usr/libexec/opensmtpd

for binary in "$root/usr/sbin/exim4" "$root/usr/sbin/smtpd"; do
    if ldd "$binary" | grep -q 'not found'; then
        echo "$binary misses shared libraries:" >&2
        ldd "$binary" | grep 'not found' >&2
        exit 1
    fi
done

printf 'interop tools ready: %s, %s, %s\n' \
    "$(postconf -d -h mail_version | sed 's/^/postfix /')" \
    "$("$root/usr/sbin/exim4" -bV -C /dev/null 2>/dev/null | sed -n 's/^Exim version \([^ ]*\).*/exim \1/p')" \
    "$("$root/usr/sbin/smtpd" -h 2>&1 | sed -n 's/^version: //Ip')"
