#!/bin/sh
# Slurm TaskProlog: gives a task the GPU share its job asked for.
#
# slurmstepd runs this as the job's user, with the task's environment, before each task.
# Lines it prints as `export NAME=value` land in the task's environment and `print TEXT`
# lines in the task's stdout; other output is dropped. A non-zero exit cancels the task
# with that exit code. See docs/slurm.md.
set -eu

# A job asks with KAIWO_GPU_FRACTION, _MEMORY, _COUNT, _ISOLATION or _STRATEGY. A grant sets
# KAIWO_GPU_ISOLATION to the isolation applied, which can differ from the one asked for (mps
# becomes cu-mask), so this script keeps the request in KAIWO_GPU_SLURM_ISOLATION for the
# tasks started from a granted one (srun in a batch script), which must ask the same again.
fraction=${KAIWO_GPU_FRACTION:-}
memory=${KAIWO_GPU_MEMORY:-}
count=${KAIWO_GPU_COUNT:-}
strategy=${KAIWO_GPU_STRATEGY:-}
asked=$fraction$memory$count$strategy
if [ -n "${KAIWO_GPU_SLURM_ISOLATION+set}" ]; then
    isolation=$KAIWO_GPU_SLURM_ISOLATION
    asked=$asked$isolation
elif [ -n "${KAIWO_GPU_ALLOCATION_ID:-}" ]; then
    # Beside a grant made elsewhere (sbatch from a shell under `kaiwo-gpu run`), it is that
    # grant's isolation, not a request: it neither asks nor shapes what is asked.
    isolation=
else
    isolation=${KAIWO_GPU_ISOLATION:-}
    asked=$asked$isolation
fi
if [ -z "$asked" ]; then
    exit 0
fi

# The task's PATH is the user's; the tools below live in the system's.
PATH=${PATH:+$PATH:}/usr/local/bin:/usr/bin:/bin
export PATH

# How the call is made is the site's, what it asks for the job's. The job's environment
# may carry a coordinator, credentials or a binary of its own (a shell under `kaiwo-gpu
# run` hands its user's on, and a user's token beats the site's certificate, so the call
# would run as that user and be refused), so those are dropped here: only the site's file
# or the defaults set them. KAIWO_GPU_TIMEOUT too, so one value holds for every job; the
# request variables above and KAIWO_GPU_SLURM_ENV stay (a job that names its own file
# only changes its own task's call, with files its user can read anyway).
unset KAIWO_GPU_COORDINATOR KAIWO_GPU_TLS_CA KAIWO_GPU_TLS_CERT KAIWO_GPU_TLS_KEY \
    KAIWO_GPU_TOKEN_FILE KAIWO_GPU_BIN KAIWO_GPU_TIMEOUT
# Read after the request, so the site's file can name the coordinator and the binary but
# cannot change what the job asked for.
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

# Label values: 1-63 of [A-Za-z0-9._-], starting and ending alphanumeric.
label_value() {
    printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '-' | cut -c1-63 |
        sed -e 's/^[^A-Za-z0-9]*//' -e 's/[^A-Za-z0-9]*$//'
}

# Request ids allow [A-Za-z0-9._:/-]; a part never holds `:`, which separates them.
id_part() {
    printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '-'
}

job_id=${SLURM_JOB_ID:-}
node=${SLURMD_NODENAME:-}
if [ -z "$job_id" ] || [ -z "$node" ]; then
    echo "print kaiwo-gpu: SLURM_JOB_ID and SLURMD_NODENAME must be set; run this as Slurm's TaskProlog"
    exit 2
fi

# One id per job and node: every task of the job on this node, in every step, gets the
# same allocation, and a job on several nodes gets one on each. A requeued job keeps its
# id but must not reuse a released request id, so its restart count is part of it. The
# parts are joined by `:`, which none of them can hold (a node name is DNS-1123), so two
# jobs never share an id: job 12 on r1-c01 is slurm:lab:12:r1-c01, and job 12 restarted
# once on c01 is slurm:lab:12:r1:c01.
request_id="slurm:$(id_part "${SLURM_CLUSTER_NAME:-cluster}"):$(id_part "$job_id")"
if [ -n "${SLURM_RESTART_COUNT:-}" ] && [ "$SLURM_RESTART_COUNT" != 0 ]; then
    request_id="$request_id:r$(id_part "$SLURM_RESTART_COUNT")"
fi
request_id="$request_id:$(id_part "$node")"

set -- allocate --request-id "$request_id" --owner "slurm/$job_id" --node "$node" -o env
# Without KAIWO_GPU_TIMEOUT the CLI's own default holds.
[ -n "${KAIWO_GPU_TIMEOUT:-}" ] && set -- "$@" --timeout "$KAIWO_GPU_TIMEOUT"
[ -n "$fraction" ] && set -- "$@" --fraction "$fraction"
[ -n "$memory" ] && set -- "$@" --memory "$memory"
[ -n "$count" ] && set -- "$@" --count "$count"
[ -n "$isolation" ] && set -- "$@" --isolation "$isolation"
[ -n "$strategy" ] && set -- "$@" --strategy "$strategy"
# Job-wide values only: every task must send the same request under the same id.
for pair in "slurm.job-id=$job_id" "slurm.user=${SLURM_JOB_USER:-${USER:-}}" \
    "slurm.partition=${SLURM_JOB_PARTITION:-}" "slurm.account=${SLURM_JOB_ACCOUNT:-}"; do
    value=$(label_value "${pair#*=}")
    [ -n "$value" ] && set -- "$@" --label "${pair%%=*}=$value"
done

# Slurm reads our stdout and stderr as one stream. On success the CLI prints only KEY=value
# lines, which become `export` lines; on failure its message becomes `print` lines, which
# reach the task's stdout, where the user sees why the task did not start.
if granted=$("$kaiwo_gpu" "$@" 2>&1); then
    status=0
else
    status=$?
fi
if [ "$status" -ne 0 ]; then
    printf 'print kaiwo-gpu: no GPU share for job %s on %s (exit %s)\n' "$job_id" "$node" "$status"
    printf '%s\n' "$granted" | sed -e '/^usage:/d' -e '/^[[:space:]]/d' -e '/^$/d' \
        -e 's/^/print kaiwo-gpu: /'
    exit "$status"
fi

# Slurm takes everything after `=` as the value, so the lines go out unquoted.
printf '%s\n' "$granted" | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*=\)/export \1/p'
# A grant variable inherited from another allocation (a mask, a device list) and not set by
# this grant must not reach the task.
for name in ROCR_VISIBLE_DEVICES HSA_CU_MASK KAIWO_GPU_ALLOCATION_ID KAIWO_GPU_NODE \
    KAIWO_GPU_FRACTION_MILLIS KAIWO_GPU_MEMORY_LIMIT_MIB KAIWO_GPU_ISOLATION; do
    case "$granted" in
    "$name="* | *"
$name="*) ;;
    *) printf 'unset %s\n' "$name" ;;
    esac
done
printf 'export KAIWO_GPU_SLURM_ISOLATION=%s\n' "$isolation"
