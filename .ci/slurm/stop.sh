#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by .ci/slurm/setup.sh (by the pid files it wrote).
set -uo pipefail
STATE_DIR="${FLASHCTL_SLURM_DIR:-/var/spool/flashctl-slurm}"
for name in slurmd slurmctld; do
    pidfile="$STATE_DIR/run/$name.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill -TERM "$(cat "$pidfile")" && echo "stopped $name"
    fi
done
