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
# * CPUs=64 with SlurmdParameters=config_overrides: Snakemake caps threads at --cores, so no
#   CPU job can ask for more than the node has, even on a 2-core machine, and a GPU job of
#   slurm/config.yaml (8 GPUs x cpus_per_gpu 8) fits too.
# * EnforcePartLimits=ALL: an impossible request fails at sbatch time instead of pending forever.
# * No slurmdbd: the Snakemake profile must use `slurm-status-command: squeue` (the overlay
#   profile scripts/local-slurm/profile does), and MinJobAge=300 keeps finished jobs visible
#   to squeue long enough to be seen.
# * RealMemory=LOCAL_SLURM_MEM_MB (default 262144, more than the machine has, accepted with
#   config_overrides; nothing enforces it without cgroups), so the per-rule memory of the real
#   profile slurm/config.yaml (64 GB per training job) is accepted as it is.
# * Partition "gpu" (State=DOWN) on the same node with 8 stand-in GPUs (gres.conf File=DIR/dev/gpu[0-7],
#   character devices like /dev/null): jobs asking for GPUs are validated and queued there, never started, so a test can
#   read the sbatch options of a GPU job (scontrol show job) on a machine without GPUs.
#   Partition "debug" (the default) runs the CPU jobs.
# Environment: LOCAL_SLURM_CPUS (default 64: 8 GPUs x cpus_per_gpu 8 of slurm/config.yaml), LOCAL_SLURM_MEM_MB (default 262144),
# LOCAL_SLURM_TIMEOUT (seconds to wait, default 90).
set -euo pipefail

DIR=${1:?usage: $0 DIR}
CPUS=${LOCAL_SLURM_CPUS:-64}
MEM=${LOCAL_SLURM_MEM_MB:-262144}
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
mkdir -p "$DIR/dev"
for i in 0 1 2 3 4 5 6 7; do   # stand-ins (copies of /dev/null): slurmd counts GPUs by File
    [ -c "$DIR/dev/gpu$i" ] || { rm -f "$DIR/dev/gpu$i"; mknod "$DIR/dev/gpu$i" c 1 3; }
done
cat > "$DIR/etc/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-7]
EOF
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
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=DOWN
EOF
mv "$CONF.tmp" "$CONF"

mkdir -p /etc/slurm
if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    log "moving the existing /etc/slurm/slurm.conf aside to slurm.conf.orig-local-slurm"
    mv /etc/slurm/slurm.conf /etc/slurm/slurm.conf.orig-local-slurm
fi
ln -sfn "$CONF" /etc/slurm/slurm.conf
if [ ! -e /etc/slurm/gres.conf ] || [ -L /etc/slurm/gres.conf ]; then   # read next to slurm.conf
    ln -sfn "$DIR/etc/gres.conf" /etc/slurm/gres.conf
fi

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

resumed=
for _ in $(seq "$((TIMEOUT * 2))"); do
    node_idle && break
    # a drain saved under an earlier slurm.conf of DIR (e.g. other GRES): resume once
    if [ -z "$resumed" ] && sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -q '^drain'; then
        sleep 2; scontrol update nodename="$NODE" state=resume 2>/dev/null || true; resumed=1
    fi
    sleep 0.5
done
if ! node_idle; then
    sinfo >&2 || true
    die "node $NODE not idle after ${TIMEOUT}s (logs in $DIR/log)"
fi
log "up: node $NODE, $CPUS CPUs, ${MEM} MB, partition debug (DIR=$DIR)"
