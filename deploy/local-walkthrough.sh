#!/usr/bin/env bash
# The job walkthrough of docs/guide/jobs.md, on this machine, from start to finish:
#   1. a token in ~/.ray/auth_token (made if missing, as cluster.local.yaml asks you to),
#   2. a one-node Ray cluster whose head starts the way cluster.local.yaml starts it: token
#      authentication, the dashboard on 127.0.0.1 only, TRAIN_DRIVER_RESOURCE for the drivers,
#   3. a check that the job server refuses a client without the token,
#   4. `ray job submit --working-dir .` of a `compat run`, `ray job logs --follow`, `ray job status`,
#   5. the results read back from the absolute run location (`compat report` re-renders them),
#   6. the head stopped by its process id (never `ray stop`, which stops every Ray of the account).
#
# Run it with the project's virtual environment active (pip install -e ".[jobs]"):
#   deploy/local-walkthrough.sh [CONFIG [KEY=VALUE]...]      # default: the built-in quickstart
# CONFIG is a built-in name or a path relative to the repository root, which is the job's --working-dir;
# each KEY=VALUE becomes a --set.
# Environment: RUNS (absolute parent of the run directory; default <repository>/runs/jobs),
#   RAY_PORT (6379), DASHBOARD_PORT (8265), RAY_START_ARGS (more `ray start` flags, e.g. --num-cpus=4),
#   JOB_ID (the submission ID; default walkthrough-<time>).
set -euo pipefail

cd "$(dirname "$0")/.."
CONFIG=${1:-quickstart}
SETS=()
for assignment in "${@:2}"; do SETS+=(--set "$assignment"); done
RUNS=${RUNS:-$PWD/runs/jobs}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
JOB_ID=${JOB_ID:-walkthrough-$(date +%Y%m%d-%H%M%S)}
ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
TOKEN_FILE=$HOME/.ray/auth_token

step() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

case $RUNS in /*) ;; *) die "RUNS must be an absolute path (the job runs in a copy of this directory), got '$RUNS'" ;; esac
# The job's entrypoint runs with the head's PATH: `python` there must be this environment's.
python -c 'import orchestrator, ray.dashboard.optional_deps' 2>/dev/null ||
    die "activate the project's environment with Ray's job server first: pip install -e '.[jobs]'"
# Validate the config here, before a cluster starts; its name gives the run directory.
RUN_DIR=$RUNS/$(python -c 'import sys
from orchestrator.engine.validate import load_experiment
print(load_experiment(sys.argv[1], sys.argv[2:]).name)' "$CONFIG" "${@:2}")

step "1. the token"
if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} && ! -s $TOKEN_FILE ]]; then
    ray get-auth-token --generate >/dev/null  # it prints the token: keep it off the terminal
    chmod 600 "$TOKEN_FILE"
fi
echo "using ${RAY_AUTH_TOKEN:+RAY_AUTH_TOKEN}${RAY_AUTH_TOKEN:-${RAY_AUTH_TOKEN_PATH:-$TOKEN_FILE}}"

step "2. a head started as cluster.local.yaml starts it"
RAY_TMP=$(mktemp -d "${TMPDIR:-/tmp}/ray-XXXXXX")  # short: Ray's socket paths live under it
HEAD_PID=
stop_head() {
    if [[ -n $HEAD_PID ]] && kill -0 "$HEAD_PID" 2>/dev/null; then
        step "6. stopping the head (pid $HEAD_PID)"
        kill -TERM "$HEAD_PID"  # `ray start --block` stops everything it started
        for _ in $(seq 60); do kill -0 "$HEAD_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$HEAD_PID" 2>/dev/null || true  # its process group, if anything is left
    fi
    rm -rf "$RAY_TMP"
}
trap stop_head EXIT
trap 'exit 130' INT TERM
set -m  # the head gets a process group of its own
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
RAY_AUTH_MODE=token RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    ray start --head --block --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --resources='{"TRAIN_DRIVER_RESOURCE": 8}' --disable-usage-stats --temp-dir="$RAY_TMP" \
    ${RAY_START_ARGS:-} >"$RAY_TMP/head.log" 2>&1 &
HEAD_PID=$!
set +m
python - "$ADDRESS" "$HEAD_PID" <<'EOF' || { tail -n 40 "$RAY_TMP/head.log" >&2; die "the head did not come up"; }
import os, sys, time, urllib.error, urllib.request
address, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    os.kill(pid, 0)  # raises once the head has exited
    try:
        urllib.request.urlopen(address + "/api/version", timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # it answers
    except OSError:
        time.sleep(1)
sys.exit(1)
EOF
echo "head pid $HEAD_PID, dashboard and job server at $ADDRESS (log: $RAY_TMP/head.log)"

step "3. without the token the job server refuses"
if refused=$(RAY_AUTH_MODE=disabled ray job submit --address "$ADDRESS" -- true 2>&1); then
    die "a client without the token submitted a job"
fi
grep -o 'Authentication required[^.]*' <<<"$refused" | head -n 1 || die "unexpected refusal: $refused"

step "4. submit, follow, status"
export RAY_AUTH_MODE=token  # the job CLI sends the token only in this mode
ray job submit --address "$ADDRESS" --working-dir . --submission-id "$JOB_ID" --no-wait \
    -- python -m orchestrator.cli run "$CONFIG" --no-progress --output-dir "$RUNS" "${SETS[@]}"
ray job logs --address "$ADDRESS" --follow "$JOB_ID"
status=$(ray job status --address "$ADDRESS" "$JOB_ID" 2>&1)
echo "$status"
grep -q "Job '$JOB_ID' succeeded" <<<"$status" || die "job $JOB_ID did not succeed"

step "5. the results, at $RUN_DIR on the head (here: this machine)"
python -m orchestrator.cli report "$RUN_DIR" | tail -n 1
ls "$RUN_DIR/metrics.json"
echo "(a remote head's runs: ray rsync-down cluster.local.yaml /mnt/shared/runs/NAME runs/ — docs/guide/jobs.md)"
