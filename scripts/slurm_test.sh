#!/usr/bin/env bash
# `make slurm-test` (issue 26): a one-node Slurm cluster on 127.0.0.1, the sweep's Slurm executor on it (see
# scripts/slurm_test.py), the daemons stopped whatever happens. Needs root (apt-get, the daemons).
set -euo pipefail
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d /tmp/loraqa-slurm-test.XXXXXX)
chmod 755 "$WORK"  # mktemp makes it 0700: munged (the munge user) keeps its socket below it
started=$(date +%s)
trap 'scripts/slurm_cluster.sh stop "$WORK/cluster"' EXIT
scripts/slurm_cluster.sh start "$WORK/cluster"
export SLURM_CONF="$WORK/cluster/slurm.conf"
$PY -c "import submitit" 2>/dev/null || $PY -m pip install --quiet -e ".[slurm]"
nice -n 19 $PY scripts/slurm_test.py "$WORK"
echo "slurm-test: wall time $(( $(date +%s) - started )) s (work dir $WORK)"
