#!/bin/sh
# Slurm Epilog: releases every GPU share a job held once the job has ended.
#
# slurmd runs this as root on each node of the job, with only SLURM_* variables set (no
# PATH, nothing from the job). A non-zero exit drains the node, so by default a failed
# release is logged and the epilog still exits 0; KAIWO_GPU_EPILOG_STRICT=yes drains the
# node instead. See docs/slurm.md.
set -eu

PATH=${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
env_file=${KAIWO_GPU_SLURM_ENV:-/etc/kaiwo-gpu/slurm.env}
if [ -r "$env_file" ]; then
    # shellcheck source=/dev/null
    . "$env_file"
fi
# The coordinator's address and the credentials the CLI proves itself with (slurm.env).
for variable in KAIWO_GPU_COORDINATOR KAIWO_GPU_TLS_CA KAIWO_GPU_TLS_CERT KAIWO_GPU_TLS_KEY \
    KAIWO_GPU_TOKEN_FILE; do
    eval "value=\${$variable:-}"
    if [ -n "$value" ]; then
        export "${variable?}"
    fi
done
kaiwo_gpu=${KAIWO_GPU_BIN:-kaiwo-gpu}
job_id=${SLURM_JOB_ID:?SLURM_JOB_ID is not set; run this as Slurm Epilog}
# The tasks of a heterogeneous job see the leader's id as SLURM_JOB_ID; its Epilog sees
# the component's, and the leader's as SLURM_HET_JOB_ID.
job_id=${SLURM_HET_JOB_ID:-$job_id}

# slurmd logs an epilog's output only when it fails, so a failure we forgive goes to
# syslog as well.
complain() {
    printf 'kaiwo-gpu epilog: %s\n' "$1" >&2
    if command -v logger >/dev/null 2>&1; then
        logger -t kaiwo-gpu-slurm -p user.err -- "$1" 2>/dev/null || :
    fi
}

finish() {
    complain "job $job_id on ${SLURMD_NODENAME:-this node}: releasing owner slurm/$job_id failed\
 (exit $1 after $2 round(s)): $3"
    case ${KAIWO_GPU_EPILOG_STRICT:-no} in
        yes | true | 1) exit "$1" ;;
    esac
    exit 0
}

# KAIWO_GPU_EPILOG_TIMEOUT bounds the Epilog's whole release, not each call: one
# `release --owner` makes a call per allocation, each under --timeout, and rounds repeat
# that, so only a deadline keeps a slow coordinator from reaching PrologEpilogTimeout
# (which drains the node). The same durations as the CLI's (parse_duration_s in
# kaiwo_gpu.common.units): 1-9 ASCII digits and one of s, m, h, d or none (90, 90s, 10m,
# 2h, 1d). A budget that is not one, or under 1s, is a site's typo: it must not keep the
# release from running (every job's share would outlive it), so the default holds instead.
duration_s() {
    case $1 in
        *s) amount=${1%s} unit=1 ;;
        *m) amount=${1%m} unit=60 ;;
        *h) amount=${1%h} unit=3600 ;;
        *d) amount=${1%d} unit=86400 ;;
        *) amount=$1 unit=1 ;;
    esac
    case $amount in
        '' | *[!0123456789]* | ??????????*) return 1 ;;
    esac
    # Leading zeros go only because $((...)) reads 010 as octal.
    amount=${amount#"${amount%%[!0]*}"}
    echo $((${amount:-0} * unit))
}
default_budget=20s
budget=${KAIWO_GPU_EPILOG_TIMEOUT:-$default_budget}
if ! budget_s=$(duration_s "$budget") || [ "$budget_s" -lt 1 ]; then
    complain "KAIWO_GPU_EPILOG_TIMEOUT=$budget is not a duration of 1s or more like 20s;\
 releasing within $default_budget"
    budget=$default_budget
    budget_s=$(duration_s "$budget")
fi
deadline=$(($(date +%s) + budget_s))
# coreutils' timeout ends a call that outlasts what is left (-k: SIGKILL 2 s after SIGTERM).
if command -v timeout >/dev/null 2>&1; then
    bounded() { timeout -k 2 "$left" "$@"; }
else
    bounded() { "$@"; }
fi

# Every node of the job runs this at about the same time, and `release --owner` lists then
# releases one by one, so another node may release an allocation first: that answers 3
# (not found), and another round releases whatever is left.
round=0 status=0 output=
while [ "$round" -lt 3 ]; do
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 1 ]; then
        finish 5 "$round" "KAIWO_GPU_EPILOG_TIMEOUT=$budget spent; last answer: $output"
    fi
    round=$((round + 1))
    call_s=$left # the CLI takes a timeout of 1s-1h
    [ "$call_s" -le 3600 ] || call_s=3600
    if output=$(bounded "$kaiwo_gpu" release --owner "slurm/$job_id" --timeout "${call_s}s" 2>&1); then
        exit 0
    else
        status=$?
    fi
    output=$(printf '%s' "$output" | tr '\n' ' ')
    case $status in
        3) ;;
        # timeout's own statuses: the call outlasted the budget. 5 is what the CLI answers
        # for a coordinator that does not answer in time.
        124 | 137) finish 5 "$round" "no answer within KAIWO_GPU_EPILOG_TIMEOUT=$budget" ;;
        *) break ;;
    esac
done
finish "$status" "$round" "$output"
