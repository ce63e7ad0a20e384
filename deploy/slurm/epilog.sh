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

# Every node of the job runs this at about the same time, and `release --owner` lists then
# releases one by one, so another node may release an allocation first: that answers 3
# (not found), and another round releases whatever is left.
for round in 1 2 3; do
    if output=$("$kaiwo_gpu" release --owner "slurm/$job_id" \
        --timeout "${KAIWO_GPU_EPILOG_TIMEOUT:-20s}" 2>&1); then
        exit 0
    else
        status=$?
    fi
    [ "$status" -eq 3 ] || break
done

complain "job $job_id on ${SLURMD_NODENAME:-this node}: releasing owner slurm/$job_id failed\
 (exit $status after $round round(s)): $(printf '%s' "$output" | tr '\n' ' ')"
case ${KAIWO_GPU_EPILOG_STRICT:-no} in
    yes | true | 1) exit "$status" ;;
esac
exit 0
