#!/bin/sh
# Builds a SIPp that speaks TLS, for tests/test_sipp.py (`make sipp` calls this as root):
#   tests/sipp/build_tls_root.sh [ROOT]        (default /var/cache/mpay/sipp-trixie)
# Debian bookworm's SIPp is built without TLS; trixie's (sip-tester 1:3.7.3, wolfSSL) has it
# but needs trixie's libc.  So ROOT is a minimal trixie (debootstrap --variant=minbase) with
# sip-tester installed, run as `chroot ROOT sipp ...` (same network, so 127.0.0.1 works), plus
# wolfssl_get_fd.c preloaded: without it that SIPp completes the TLS handshake and then sends
# nothing (see that file).  ROOT is outside the checkout, so it is built once per machine:
# into ROOT.tmp, renamed to ROOT only when complete.  Exit 0 when ROOT is there; else non-zero,
# with the build's output in ROOT.log.
set -eu
PATH=$PATH:/usr/sbin:/sbin
root=${1:-/var/cache/mpay/sipp-trixie}
here=$(cd "$(dirname "$0")" && pwd)
ready() { [ -x "$root/usr/bin/sipp" ]; }    # only a complete build is ever renamed to ROOT
ready && exit 0
[ "$(id -u)" = 0 ] || { echo "building $root needs root (debootstrap, chroot)" >&2; exit 1; }
command -v cc >/dev/null || { echo "building $root needs a C compiler (cc)" >&2; exit 1; }
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9                  # one build at a time; a second waits, then finds ROOT ready
ready && exit 0
tmp=$root.tmp
log=$root.log
: >"$log"
build() {
    if [ -e "$tmp" ]; then   # left by a build that was killed: its mounts first, then the files
        for m in dev/pts proc sys; do umount "$tmp/$m" 2>/dev/null || true; done
        rm -rf --one-file-system "$tmp"
    fi
    if ! command -v debootstrap >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    fi
    debootstrap --variant=minbase trixie "$tmp"
    DEBIAN_FRONTEND=noninteractive chroot "$tmp" apt-get install -y -q --no-install-recommends sip-tester
    cc -shared -fPIC -O2 -Wall -o "$tmp/usr/local/lib/wolfssl_get_fd.so" "$here/wolfssl_get_fd.c" -ldl
    echo /usr/local/lib/wolfssl_get_fd.so >"$tmp/etc/ld.so.preload"
    chroot "$tmp" sipp -v | grep -- "-TLS"
    chroot "$tmp" apt-get clean
    rm -rf "$tmp"/var/lib/apt/lists/*
    mv -T "$tmp" "$root"
}
trap 'echo "building $root failed; its output: $log" >&2' EXIT
build >>"$log" 2>&1
trap - EXIT
