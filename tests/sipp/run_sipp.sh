#!/bin/sh
# Runs a SIPp scenario against a running mpay server:
#   tests/sipp/run_sipp.sh HOST:PORT [SCENARIO.xml] [CALLS] [TRANSPORT]
# TRANSPORT is SIPp's -t mode: u1 (UDP, the default), t1 (TCP, one connection) or l1 (TLS,
# one connection).  TLS uses the SIPp of tests/sipp/build_tls_root.sh, chrooted (so as root),
# from $SIPP_TLS_ROOT (default /var/cache/mpay/sipp-trixie), with a throwaway client
# certificate; SIPp checks the server's certificate only against $SIPP_TLS_CA, when set.
# e.g. with `make run` going:  tests/sipp/run_sipp.sh 127.0.0.1:5060
# Exit status is SIPp's (0: every call succeeded); SIPp's error log is shown on failure.
set -u
PATH=$PATH:/usr/sbin:/sbin
target=${1:?usage: run_sipp.sh HOST:PORT [SCENARIO.xml] [CALLS] [TRANSPORT]}
here=$(cd "$(dirname "$0")" && pwd)
scenario=${2:-$here/options_retransmit.xml}
calls=${3:-20}
mode=${4:-u1}
case $mode in
    l*) root=${SIPP_TLS_ROOT:-/var/cache/mpay/sipp-trixie}
        if [ ! -x "$root/usr/bin/sipp" ]; then
            echo "no SIPp with TLS in $root: tests/sipp/build_tls_root.sh builds it (as root)"
            exit 2
        fi
        workdir=$(mktemp -d "$root/tmp/run_sipp.XXXXXX") || exit 2 ;;
    *)  workdir=$(mktemp -d) || exit 2 ;;
esac
trap 'rm -rf "$workdir"' EXIT
cp "$scenario" "$workdir/" || exit 2
cd "$workdir" || exit 2
# No -p: SIPp takes a free local port, so it never collides with a server on 5060.
set -- "$target" -sf "$(basename "$scenario")" -m "$calls" -r 50 -i 127.0.0.1 -s ping -t "$mode" \
    -timeout 30s -timeout_error -recv_timeout 5000 -nostdin -nd -trace_err -trace_stat
case $mode in
    l*) openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
            -subj /CN=sipp -keyout client.key -out client.crt 2>/dev/null || exit 2
        set -- "$@" -tls_cert client.crt -tls_key client.key
        if [ -n "${SIPP_TLS_CA:-}" ]; then
            cp "$SIPP_TLS_CA" server-ca.crt || exit 2
            set -- "$@" -tls_ca server-ca.crt
        fi
        chroot "$root" env -C "${workdir#"$root"}" sipp "$@" ;;
    *)  sipp "$@" ;;
esac >sipp.out 2>&1
status=$?
echo "sipp exit status $status after $calls calls of $(basename "$scenario")"
if [ "$status" -ne 0 ]; then
    tail -n 30 sipp.out
    cat ./*_errors.log 2>/dev/null | tail -n 40
fi
exit "$status"
