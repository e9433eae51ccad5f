#!/usr/bin/env bash
# A real SLURM cluster on this host (munged + slurmctld + one slurmd per node), for trying
# the sbatch templates and for the `slurm` tests. Not for production: no accounting, no cgroups.
# With SLURM_LOCAL_NODES=2 it emulates two nodes on this one machine (`$(hostname -s)` and
# `localhost`, each its own slurmd on its own port, each offering all CPUs): enough to run the
# multi-node template as a 2-node job whose node ranks rendezvous over 127.0.0.1.
#
#   experiments/slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (root, Debian)
#   experiments/slurm/local_cluster.sh start     # writes $SLURM_LOCAL_DIR/slurm.conf, starts daemons
#   export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf   # then sbatch / squeue / scancel use it
#   experiments/slurm/local_cluster.sh stop
#
# Settings (environment): SLURM_LOCAL_DIR (default /tmp/jepa-slurm), SLURM_LOCAL_PORT
# (slurmctld port, default 6817; the slurmds use the next ones), SLURM_LOCAL_NODES (1 or 2).
# Every failure exits non-zero with the reason and the tail of the daemon's log, so a test can
# report why SLURM did not start.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/jepa-slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
NODE=$(hostname -s)
N_NODES=${SLURM_LOCAL_NODES:-1}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() {
    echo "local_cluster: $*" >&2
    for log in "$DIR"/munged.log "$DIR"/slurmctld.log "$DIR"/slurmd-*.log; do
        [[ -s $log ]] && { echo "--- tail of $log" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        echo "slurm-wlm and munge already installed"
        return
    fi
    [[ $(id -u) == 0 ]] || die "installing needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm and munge by hand"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null ||
        die "apt-get install slurm-wlm munge failed"
}

node_names() {
    case $N_NODES in
    1) echo "$NODE" ;;
    2)
        [[ $NODE != localhost ]] || die "SLURM_LOCAL_NODES=2 needs a hostname other than localhost"
        echo "$NODE localhost"
        ;;
    *) die "SLURM_LOCAL_NODES=$N_NODES: only 1 or 2 nodes can be emulated on one host" ;;
    esac
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/munge"
    local cpus mem names nodes="" i=0
    cpus=$(nproc)
    mem=$((($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512) / N_NODES))
    names=$(node_names)
    cat >"$CONF" <<EOF
# written by experiments/slurm/local_cluster.sh
ClusterName=jepa-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
EOF
    for name in $names; do
        i=$((i + 1))
        echo "NodeName=$name NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
        nodes=${nodes:+$nodes,}$name
    done
    echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4" >>"$CONF"
}

start_munge() {
    local socket=$DIR/munge/munge.socket
    if [[ -S $socket ]] && munge -n -S "$socket" >/dev/null 2>&1; then
        return
    fi
    local key=/etc/munge/munge.key
    [[ -s $key ]] || mungekey --create --keyfile="$key" || die "cannot create $key"
    # root runs it (--force): containers often lack the munge user's directories
    munged --force --socket="$socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed" --key-file="$key" ||
        die "munged did not start"
    munge -n -S "$socket" | unmunge -S "$socket" >/dev/null || die "munge round trip failed"
}

start() {
    command -v slurmctld >/dev/null || die "slurmctld not found: run '$0 install' first"
    stop_daemons quiet
    write_conf
    start_munge
    # Both daemons talk to munged through the socket named in the environment.
    echo "AuthInfo=socket=$DIR/munge/munge.socket" >>"$CONF"
    slurmctld -f "$CONF" || die "slurmctld did not start"
    for name in $(node_names); do
        slurmd -f "$CONF" -N "$name" || die "slurmd of node $name did not start"
    done
    for _ in $(seq 60); do
        if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)') == "$N_NODES" ]]; then
            echo "SLURM up: node(s) $(node_names) ($(nproc) CPUs each); export SLURM_CONF=$CONF"
            return
        fi
        sleep 1
    done
    die "nodes $(node_names) did not all become idle: $(sinfo -h -N -o '%N %T %E' 2>&1)"
}

stop_daemons() {
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if [[ -s $pidfile ]]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    [[ ${1:-} == quiet ]] || echo "SLURM stopped"
}

case ${1:-} in
install) install ;;
start) start ;;
stop) stop_daemons ;;
conf) write_conf && echo "$CONF" ;;
*) echo "usage: $0 install|start|stop|conf" >&2 && exit 2 ;;
esac
