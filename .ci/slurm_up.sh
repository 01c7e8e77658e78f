#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests that run the workflow through
# `--profile profiles/slurm` (tests/test_slurm.py). Idempotent: safe to run again; a running
# cluster with the same configuration is left alone.
#
# What it does (a recipe checked on this kind of machine; profiles/slurm/README.md):
#   apt-get install slurmctld slurmd slurm-client munge (Debian's Slurm 22.05),
#   /etc/slurm/slurm.conf + gres.conf (the plugin's job step strips SLURM_CONF, so the conf must
#   be at the default path), a munge key, then munged, slurmctld and slurmd started directly
#   (no systemd here), and waits until `sinfo` shows the node idle.
#
# The node has two partitions named like the placeholders in profiles/slurm/partitions.yaml
# ("cpu", the default, and "gpu"), and two stand-in GPUs (GRES backed by /dev/null and /dev/zero)
# so that jobs with `resources: gpu=N` (N <= 2) are accepted by sbatch and get
# CUDA_VISIBLE_DEVICES exactly as on a GPU node; 2 lets a test catch a job run once per GPU.
#
# Needs root. Exit status 0 only when the cluster accepts jobs.
set -euo pipefail

readonly CONF_DIR=/etc/slurm
readonly STATE_DIR=/var/spool/slurmctld
readonly SPOOL_DIR=/var/spool/slurmd
readonly LOG_DIR=/var/log/slurm
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_PID=/run/munge/munged.pid
readonly WAIT_S=${SLURM_UP_WAIT_S:-60}

die() {
    echo "slurm_up.sh: ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [[ -s $f ]]; then
            echo "---- last lines of $f ----" >&2
            tail -n 20 "$f" >&2
        fi
    done
    exit 1
}

log() { echo "slurm_up.sh: $*"; }

# pid from a pid file, if that process is alive
alive_pid() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo sbatch munged mungekey; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if ((${#missing[@]} == 0)); then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script expects Debian/Ubuntu"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null || die "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null || die "apt-get install of slurm/munge failed"
    for cmd in slurmctld slurmd sinfo sbatch munged mungekey; do
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' still missing after apt-get install"
    done
}

# Writes $2 to $1 only when it differs; returns 0 when the file changed.
write_if_changed() {
    local path=$1 text=$2
    if [[ -f $path ]] && [[ "$(<"$path")" == "$text" ]]; then
        return 1
    fi
    printf '%s\n' "$text" >"$path.tmp"
    mv "$path.tmp" "$path"
    return 0
}

write_config() {
    local node=$1 cpus=$2 mem_mb=$3 changed=1
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    local conf
    conf=$(
        cat <<EOF
# Written by .ci/slurm_up.sh: one node, no accounting, no cgroups (CI container, no systemd).
ClusterName=remeanflow-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# keep finished jobs visible to squeue/scontrol for 5 min: the executor plugin polls with squeue
MinJobAge=300
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
GresTypes=gpu
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=${node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${node} Default=NO MaxTime=INFINITE State=UP
EOF
    )
    # stand-in devices: `srun --gpus=2` then sets CUDA_VISIBLE_DEVICES=0,1 like on a GPU node
    local gres
    gres=$(printf 'NodeName=%s Name=gpu File=%s\n' "$node" /dev/null "$node" /dev/zero)
    write_if_changed "$CONF_DIR/slurm.conf" "$conf" && changed=0
    write_if_changed "$CONF_DIR/gres.conf" "$gres" && changed=0
    return $changed
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey -c -k /etc/munge/munge.key || die "mungekey -c failed"
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    # slurmd/slurmctld (root) and job steps must reach munged's socket
    chmod 755 /run/munge
    if ! alive_pid "$MUNGE_PID" >/dev/null; then
        log "starting munged"
        runuser -u munge -- munged --pid-file="$MUNGE_PID" || die "munged did not start"
    fi
    munge -n | unmunge >/dev/null 2>&1 || die "munge round trip failed (munge -n | unmunge)"
}

stop_daemon() {
    local pidfile=$1 pid
    if pid=$(alive_pid "$pidfile"); then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || return 0
            sleep 0.2
        done
        die "process $pid ($pidfile) did not stop"
    fi
}

start_slurm() {
    if ! alive_pid "$CTLD_PID" >/dev/null; then
        log "starting slurmctld"
        slurmctld || die "slurmctld did not start"
    fi
    if ! alive_pid "$SLURMD_PID" >/dev/null; then
        log "starting slurmd"
        slurmd || die "slurmd did not start"
    fi
}

wait_idle() {
    local node=$1 state="" deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1 || true)
        case $state in
        idle* | mixed* | allocated* | completing*)
            log "node $node is $state; partitions: $(sinfo -h -o %P | tr '\n' ' ')"
            return 0
            ;;
        down* | drain* | drained* | fail*)
            # e.g. left down by an earlier run with another configuration
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
            ;;
        esac
        sleep 0.5
    done
    die "node $node not idle after ${WAIT_S}s (sinfo state: '${state:-none}')"
}

main() {
    [[ $(id -u) -eq 0 ]] || die "needs root (installs packages and starts daemons)"
    install_packages
    local node cpus mem_kb mem_mb
    node=$(hostname -s)
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # below the machine's memory, as slurmd refuses a node that claims more than it has
    mem_mb=$((mem_kb / 1024 * 8 / 10))
    if write_config "$node" "$cpus" "$mem_mb"; then
        log "configuration written to $CONF_DIR (node $node, $cpus CPUs, ${mem_mb} MB, 2 stand-in GPUs)"
        # daemons started with an older configuration must pick up the new one
        stop_daemon "$SLURMD_PID"
        stop_daemon "$CTLD_PID"
    fi
    start_munge
    start_slurm
    wait_idle "$node"
}

main "$@"
