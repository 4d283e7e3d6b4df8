#!/usr/bin/env bash
# Stop the one-node cluster started by scripts/local-slurm/start.sh DIR (idempotent).
#
#   scripts/local-slurm/stop.sh DIR [--purge]
#
# Cancels every job, then stops slurmd, slurmctld and munged by the PIDs recorded in DIR/pids
# (TERM, then KILL after 15 s). --purge also deletes DIR and the /etc/slurm/slurm.conf link
# (restoring a configuration that start.sh moved aside).
set -euo pipefail

DIR=${1:?usage: $0 DIR [--purge]}
PURGE=${2:-}
log() { echo "local-slurm: $*" >&2; }

if [ ! -d "$DIR" ]; then
    log "nothing to stop ($DIR does not exist)"
    exit 0
fi
DIR=$(cd "$DIR" && pwd)

if [ -s "$DIR/pids/slurmctld.pid" ] && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 20); do
            [ -z "$(squeue -h -t PD,R,CG -o %i 2>/dev/null || true)" ] && break
            sleep 0.5
        done
    fi
fi

stop() { # stop NAME: TERM the recorded PID, KILL it after 15 s
    local f="$DIR/pids/$1.pid" pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$1 ($pid) ignored TERM, killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

stop slurmd
stop slurmctld
stop munged
log "stopped (DIR=$DIR)"

if [ "$PURGE" = "--purge" ]; then
    if [ -L /etc/slurm/gres.conf ] && [ "$(readlink /etc/slurm/gres.conf)" = "$DIR/etc/gres.conf" ]; then
        rm -f /etc/slurm/gres.conf
    fi
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$DIR/etc/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
        if [ -e /etc/slurm/slurm.conf.orig-local-slurm ]; then
            mv /etc/slurm/slurm.conf.orig-local-slurm /etc/slurm/slurm.conf
        fi
    fi
    rm -rf "$DIR"
    log "purged $DIR"
fi
