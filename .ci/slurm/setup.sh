#!/usr/bin/env bash
# Install Debian's Slurm + MUNGE and start a one-node cluster on this machine (for CI / tests).
#
#   .ci/slurm/setup.sh          # exits 0 once `sinfo` shows the node idle
#   .ci/slurm/stop.sh           # stops the daemons this script started
#
# Idempotent: when `sinfo` already shows an idle node it exits at once. It writes
# /etc/slurm/slurm.conf (the path Debian's client commands read) only if that file is absent
# or was written by this script, so it never overwrites a real cluster's configuration.
# Plugins are chosen to need no cgroups and no systemd (containers, running as root):
# proctrack/linuxproc, task/none, jobacct_gather/none, no accounting database.
# On failure it prints one line starting with "slurm setup failed:" (tests use it as the
# skip reason) followed by the daemons' log tails.
set -uo pipefail

STATE_DIR="${FLASHCTL_SLURM_DIR:-/var/spool/flashctl-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by flashctl .ci/slurm/setup.sh"
WAIT_S="${FLASHCTL_SLURM_WAIT_S:-60}"

fail() {
    echo "slurm setup failed: $*"
    for log in "$STATE_DIR"/log/slurmctld.log "$STATE_DIR"/log/slurmd.log /var/log/munge/munged.log; do
        [ -f "$log" ] && { echo "--- tail $log"; tail -n 15 "$log"; }
    done
    exit 1
}

node_idle() {
    command -v sinfo >/dev/null 2>&1 || return 1
    timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

if node_idle; then
    echo "slurm already running: $(sinfo -h -N -o '%N %T %c CPUs %m MB' | head -n 1)"
    exit 0
fi

# ---- 1. packages
if ! command -v slurmd >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
        || ! command -v munged >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "packages slurm-wlm/munge are missing and installing them needs root"
    command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (this script targets Debian/Ubuntu)"
    export DEBIAN_FRONTEND=noninteractive
    echo "installing slurm-wlm + munge (apt-get) ..."
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/flashctl-slurm-apt.log 2>&1; then
        apt-get update -q >>/tmp/flashctl-slurm-apt.log 2>&1
        apt-get install -y -q --no-install-recommends slurm-wlm munge >>/tmp/flashctl-slurm-apt.log 2>&1 \
            || fail "apt-get install slurm-wlm munge failed (see /tmp/flashctl-slurm-apt.log)"
    fi
fi

# ---- 2. munge (authentication between the Slurm daemons and clients)
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile /etc/munge/munge.key || fail "mungekey could not create a key"
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
if id munge >/dev/null 2>&1; then
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    MUNGE_AS=(runuser -u munge --)
else
    MUNGE_AS=()
fi
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    "${MUNGE_AS[@]}" munged || fail "munged did not start"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || fail "munged started but munge -n | unmunge fails"
fi

# ---- 3. slurm.conf for one node with this machine's real CPUs / memory
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script; refusing to overwrite it"
fi
HOST="$(hostname -s)"
mkdir -p "$STATE_DIR"/ctld "$STATE_DIR"/d "$STATE_DIR"/log "$STATE_DIR"/run /etc/slurm
# `slurmd -C` prints this machine's NodeName line (CPUs, sockets, cores, threads, RealMemory).
NODE_LINE="$(slurmd -C 2>/dev/null | grep '^NodeName=')" || fail "slurmd -C could not describe this node"
NODE_LINE="$(echo "$NODE_LINE" | sed -E "s/^NodeName=[^ ]+/NodeName=$HOST/")"
cat >"$CONF".tmp <<EOF
$MARKER
ClusterName=flashctl-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=30
MpiDefault=none
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
mv "$CONF".tmp "$CONF"

# ---- 4. daemons
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running "$STATE_DIR/run/slurmctld.pid" || slurmctld || fail "slurmctld did not start"
for _ in $(seq 20); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
running "$STATE_DIR/run/slurmd.pid" || slurmd || fail "slurmd did not start"

for i in $(seq "$WAIT_S"); do
    node_idle && { echo "slurm ready after ${SECONDS}s: $(sinfo -h -N -o '%N %T %c CPUs %m MB' | head -n 1)"; exit 0; }
    # A node that registered as down/drained (e.g. after a restart) is put back in service.
    if [ "$i" = 10 ]; then scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1; fi
    sleep 1
done
fail "node not idle after ${WAIT_S}s: $(timeout 5 sinfo -h -N -o '%N %T %E' 2>&1 | head -n 1)"
