#!/usr/bin/env bash
# Start a one-node SLURM cluster on 127.0.0.1, for CI and for trying the SLURM profile locally.
#
#   scripts/local-slurm/start.sh DIR      # idempotent; state, logs and PID files go under DIR
#   scripts/local-slurm/stop.sh DIR       # cancel the jobs and stop the daemons
#
# Debian/Ubuntu, as root, no systemd needed. Installs munge, slurmctld, slurmd and slurm-client
# with apt if they are missing, writes DIR/etc/slurm.conf, links /etc/slurm/slurm.conf to it
# (Snakemake's in-job srun drops SLURM_CONF, so the config must be at the default path), starts
# munged, slurmctld and slurmd in the foreground under setsid (so the PID files hold the daemons'
# own PIDs) and waits until `sinfo` shows the node idle.
#
# Facts behind the settings (docs: shared/notes/local-slurm.md):
# * CPUs=8 with SlurmdParameters=config_overrides: Snakemake caps threads at --cores 8, so no
#   job can ask for more than the node has, even on a 2-core machine.
# * EnforcePartLimits=ALL: an impossible request fails at sbatch time instead of pending forever.
# * No slurmdbd: the Snakemake profile must use `slurm-status-command: squeue`, and
#   MinJobAge=300 keeps finished jobs visible to squeue long enough to be seen.
# Environment: LOCAL_SLURM_CPUS (default 8), LOCAL_SLURM_TIMEOUT (seconds to wait, default 90).
set -euo pipefail

DIR=${1:?usage: $0 DIR}
CPUS=${LOCAL_SLURM_CPUS:-8}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-90}
PACKAGES=(munge slurmctld slurmd slurm-client)

log() { echo "local-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (installs packages, writes /etc/slurm, runs the daemons)"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
NODE=$(hostname -s)
CONF="$DIR/etc/slurm.conf"

alive() { # alive NAME: the daemon of DIR/pids/NAME.pid is running
    local f="$DIR/pids/$1.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

node_idle() {
    sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

if alive munged && alive slurmctld && alive slurmd && node_idle; then
    log "already running (DIR=$DIR)"
    exit 0
fi

# --- packages -----------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- directories and munge ----------------------------------------------------------------
mkdir -p "$DIR"/etc "$DIR"/log "$DIR"/pids "$DIR"/spool/ctld "$DIR"/spool/d
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# --- slurm.conf ---------------------------------------------------------------------------
MEM=$(slurmd -C 2>/dev/null | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
[ -n "$MEM" ] || die "could not read RealMemory from 'slurmd -C'"
cat > "$CONF.tmp" <<EOF
# written by scripts/local-slurm/start.sh: a one-node cluster on 127.0.0.1
ClusterName=localslurm
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
MinJobAge=300
ReturnToService=2
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/pids/slurmctld.daemon.pid
SlurmdPidFile=$DIR/pids/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"

mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    log "moving the existing /etc/slurm/slurm.conf aside to slurm.conf.orig-local-slurm"
    mv /etc/slurm/slurm.conf /etc/slurm/slurm.conf.orig-local-slurm
fi
ln -sfn "$CONF" /etc/slurm/slurm.conf

# --- daemons ------------------------------------------------------------------------------
start() { # start NAME CMD...: run CMD in the foreground under setsid, record its PID
    local name=$1
    shift
    if alive "$name"; then
        return
    fi
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/pids/$name.pid"
}

start munged setpriv --reuid=munge --regid=munge --init-groups munged -F
for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.2
done
munge -n | unmunge >/dev/null 2>&1 || die "munged did not start (see $DIR/log/munged.out)"

if alive slurmctld; then
    scontrol reconfigure >/dev/null 2>&1 || true
fi
start slurmctld slurmctld -D -f "$CONF"
start slurmd slurmd -D -N "$NODE" -f "$CONF"

for _ in $(seq "$((TIMEOUT * 2))"); do
    node_idle && break
    sleep 0.5
done
if ! node_idle; then
    sinfo >&2 || true
    die "node $NODE not idle after ${TIMEOUT}s (logs in $DIR/log)"
fi
log "up: node $NODE, $CPUS CPUs, ${MEM} MB, partition debug (DIR=$DIR)"
