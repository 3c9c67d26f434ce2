#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (Debian 12: Slurm 22.05).
#
# Idempotent: installs slurm-wlm + munge when missing, creates a munge key when
# missing, (re)writes slurm.conf for this host, starts munged / slurmctld /
# slurmd unless already running, and waits until the node is idle.
# Needs root (or passwordless sudo). On failure prints log tails, exits non-zero.
#
# Environment: SLURM_UP_TIMEOUT (seconds to wait for an idle node, default 60),
# SLURM_UP_RESTART=1 (restart the daemons even if they are running).
set -euo pipefail

TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
SPOOL=/var/spool
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"

log() { echo "[slurm_up] $*"; }

fail() {
    log "FAILED: $*"
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [ -r "$f" ] && { echo "---- tail $f"; tail -n 30 "$f"; }
    done
    command -v sinfo >/dev/null && { echo "---- sinfo"; sinfo -N -l 2>&1 || true; }
    command -v scontrol >/dev/null && { echo "---- node"; scontrol show node 2>&1 | head -30 || true; }
    exit 1
}

# --- packages -----------------------------------------------------------------
need_pkgs=()
for bin in slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client munged:munge; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || need_pkgs+=("${bin##*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing slurm-wlm munge (missing: ${need_pkgs[*]})"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || fail "apt-get update"
    $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/tmp/slurm_up_apt.log 2>&1 \
        || { tail -n 30 /tmp/slurm_up_apt.log; fail "apt-get install slurm-wlm munge"; }
fi
log "$(slurmctld -V)"

# --- munge ----------------------------------------------------------------------
$SUDO mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
$SUDO chmod 0700 /etc/munge /var/lib/munge /var/log/munge
$SUDO chmod 0755 /run/munge
$SUDO chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    $SUDO rm -f /run/munge/munged.pid
    $SUDO runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || fail "munge credential round trip"
fi

# --- slurm.conf -------------------------------------------------------------------
HOST=$(hostname -s)
# `slurmd -C` reports this machine's real topology and memory: using it keeps the
# node from being drained for advertising more than it has.
NODE_LINE=$(slurmd -C 2>/dev/null | grep '^NodeName=' || true)
if [ -z "$NODE_LINE" ]; then
    NODE_LINE="NodeName=$HOST CPUs=$(nproc) RealMemory=$(free -m | awk '/^Mem:/{print $2}')"
fi
NODE_LINE=$(sed -E "s/^NodeName=[^ ]+/NodeName=$HOST/" <<<"$NODE_LINE")
CPUS=$(grep -oE 'CPUs=[0-9]+' <<<"$NODE_LINE" | cut -d= -f2)
MEM=$(grep -oE 'RealMemory=[0-9]+' <<<"$NODE_LINE" | cut -d= -f2)
DEF_MEM=$((MEM / CPUS))

$SUDO mkdir -p "$CONF_DIR" "$LOG_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd"
NEW_CONF=$(mktemp)
cat >"$NEW_CONF" <<EOF
# One-node test cluster written by .ci/slurm_up.sh for host $HOST.
ClusterName=caldpo
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire+1 s before they may start again (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
GresTypes=gpu
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to scontrol (no accounting database here).
MinJobAge=900
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
# Seconds between SIGTERM and SIGKILL: the time a stopping job has to checkpoint.
KillWait=15
Waittime=0
MessageTimeout=20
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
CONF_CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF_DIR/slurm.conf"; then
    $SUDO install -m 0644 "$NEW_CONF" "$CONF_DIR/slurm.conf"
    CONF_CHANGED=1
    log "wrote $CONF_DIR/slurm.conf ($NODE_LINE)"
fi
rm -f "$NEW_CONF"
# No cgroup plugin is used (linuxproc + task/none); an explicit cgroup.conf keeps
# slurmd from probing cgroup mounts that containers often lack.
if [ ! -f "$CONF_DIR/cgroup.conf" ]; then
    printf 'CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n' \
        | $SUDO tee "$CONF_DIR/cgroup.conf" >/dev/null
fi
# An empty gres.conf: the gpu GRES type exists, this node has none (jobs ask 0).
[ -f "$CONF_DIR/gres.conf" ] || $SUDO touch "$CONF_DIR/gres.conf"

# --- daemons ------------------------------------------------------------------
running() { pgrep -x "$1" >/dev/null 2>&1; }
if [ "${SLURM_UP_RESTART:-0}" = 1 ] || { [ "$CONF_CHANGED" = 1 ] && { running slurmctld || running slurmd; }; }; then
    log "restarting daemons"
    for d in slurmd slurmctld; do
        [ -f "/run/$d.pid" ] && $SUDO kill "$(cat "/run/$d.pid")" 2>/dev/null || true
    done
    for _ in $(seq 30); do running slurmctld || running slurmd || break; sleep 0.5; done
fi
if ! running slurmctld; then
    log "starting slurmctld"
    $SUDO slurmctld || fail "slurmctld did not start"
fi
if ! running slurmd; then
    log "starting slurmd"
    $SUDO slurmd || fail "slurmd did not start"
fi

# --- wait for an idle node ----------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
while :; do
    state=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mix|alloc) log "node $HOST is $state"; break ;;
        drain*|drng|down*|fail*)
            # A node drained by an earlier config or restart comes back on resume.
            $SUDO scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    [ $SECONDS -lt $deadline ] || fail "node $HOST not idle after ${TIMEOUT}s (state: ${state:-none})"
    sleep 1
done
sinfo
