#!/usr/bin/env bash
# Install a one-node SLURM (Debian's slurm-wlm: slurmctld + slurmd + client) and munge,
# used by tests/test_slurm.py. Idempotent: does nothing when slurmctld is already there.
# Quiet: prints one line with the time taken (apt's output goes to a log on failure only).
set -euo pipefail

start=$(date +%s)
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

if have slurmctld && have slurmd && have munged && have sbatch; then
    echo "install_slurm: slurm already installed ($(/usr/sbin/slurmctld -V 2>/dev/null || slurmctld -V)), 0 s"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install_slurm: not root, cannot apt-get install slurm-wlm" >&2
    exit 1
fi

log=$(mktemp /tmp/install_slurm.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
# Keep the packages' postinst scripts from trying to start the daemons (no init system
# in containers/CI; the tests start their own daemons with their own config).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

if ! { apt-get update -qq && \
       apt-get install -y -qq --no-install-recommends slurm-wlm slurm-client munge; } >"$log" 2>&1; then
    echo "install_slurm: apt-get failed, last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
rm -f "$log"
echo "install_slurm: installed $(/usr/sbin/slurmctld -V) in $(( $(date +%s) - start )) s"
