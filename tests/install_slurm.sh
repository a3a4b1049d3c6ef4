#!/usr/bin/env bash
# Install a local SLURM (slurm-wlm) and munge for tests/integration/test_slurm.py, when they are missing.
#
#     bash tests/install_slurm.sh      # from `make test`; safe to run again (does nothing then)
#
# Only as root on Debian/Ubuntu (apt-get); anywhere else it says why and exits 0, and the SLURM
# tests skip with their own reason. Nothing is configured or started here: the test fixture
# (tests/slurm_cluster.py) runs its own daemons from a temporary folder and stops them.
set -uo pipefail

say() { echo "install_slurm: $*"; }

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    exit 0  # already installed: stay quiet
fi
if [[ "$(id -u)" != 0 ]]; then
    say "not root: cannot install slurm-wlm and munge (the SLURM tests will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    say "no apt-get (not Debian/Ubuntu): install slurm-wlm and munge yourself to run the SLURM tests"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts try to start services; in containers without an init
# system that fails, so keep them from starting anything (the tests start their own daemons).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
fi
cleanup() { if [[ "$made_policy" == 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

log=$(mktemp)
# Package lists may be missing or stale (a fresh container has none): update once, then install.
if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } \
        >"$log" 2>&1; then
        say "apt-get could not install slurm-wlm and munge (the SLURM tests will skip); its last lines:"
        tail -n 5 "$log" | sed 's/^/    /'
        rm -f "$log"
        exit 0
    fi
fi
rm -f "$log"
say "installed $(slurmctld -V 2>/dev/null || echo slurm) and $(munged -V 2>/dev/null | head -n1 || echo munge)"
