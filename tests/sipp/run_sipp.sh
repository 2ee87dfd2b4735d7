#!/bin/sh
# Runs a SIPp scenario against a running mpay server:
#   tests/sipp/run_sipp.sh HOST:PORT [SCENARIO.xml] [CALLS] [TRANSPORT]
# TRANSPORT is SIPp's -t mode: u1 (UDP, the default) or t1 (TCP, one connection).
# e.g. with `make run` going:  tests/sipp/run_sipp.sh 127.0.0.1:5060
# Exit status is SIPp's (0: every call succeeded); SIPp's error log is shown on failure.
set -u
target=${1:?usage: run_sipp.sh HOST:PORT [SCENARIO.xml] [CALLS]}
here=$(cd "$(dirname "$0")" && pwd)
scenario=${2:-$here/options_retransmit.xml}
calls=${3:-20}
mode=${4:-u1}
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
cd "$workdir" || exit 2
# No -p: SIPp takes a free local port, so it never collides with a server on 5060.
sipp "$target" -sf "$scenario" -m "$calls" -r 50 -i 127.0.0.1 -s ping -t "$mode" \
    -timeout 30s -timeout_error -recv_timeout 5000 -nostdin -nd -trace_err -trace_stat >sipp.out 2>&1
status=$?
echo "sipp exit status $status after $calls calls of $(basename "$scenario")"
if [ "$status" -ne 0 ]; then
    tail -n 30 sipp.out
    cat ./*_errors.log 2>/dev/null | tail -n 40
fi
exit "$status"
