#!/usr/bin/env bash
# Install the test batch scheduler: Slurm (controller, node daemon, clients) and
# its PBS/Torque command wrappers (qsub, qstat, qdel), from Debian's packages.
# Idempotent and fast when everything is already installed. Needs root.
# Used by `make test` and by tests/conftest.py (see tests/slurm_cluster.py).
# Note: slurm-wlm-torque repoints /usr/bin/mpirun (alternatives); that is fine here.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-torque)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]] && command -v slurmctld >/dev/null && command -v qsub >/dev/null; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-test-scheduler.sh: need root to install: ${missing[*]:-${PACKAGES[*]}}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${PACKAGES[@]}"
}

echo "install-test-scheduler.sh: installing ${missing[*]:-${PACKAGES[*]}}" >&2
# Try without refreshing the package lists first (fast when they are fresh);
# refresh them only if that fails (fresh machine: empty or stale lists).
if ! apt_install; then
    apt-get update -q
    apt_install
fi

command -v slurmctld >/dev/null
command -v qsub >/dev/null
