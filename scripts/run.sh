#!/usr/bin/env bash
# `make run`: the whole product on this machine. Starts the service, a local Prefect server and the process
# that runs the deployments, and says "Everything is up" as soon as the playground and the Prefect UI answer;
# then it runs the retrain deployment once, in the foreground (it trains when the corpus differs from what the
# promoted model learnt, or when that model learnt fewer steps than asked). The playground shows that training
# live and switches to its model once it is promoted. Ctrl-C stops everything it started. Running it again
# reuses what is there (cached encoding, finished checkpoints, the promoted model).
#
# Environment: CHAR_RNN_HOME (./.char-rnn), CHAR_RNN_DATA (your folder of .txt files; default
# $CHAR_RNN_HOME/corpus, seeded with data/tinyshakespeare.txt when empty), STEPS and HIDDEN (default: the
# model's and training's own defaults), PREFECT_SERVER_API_PORT (Prefect's API and UI, 4200), CHAR_RNN_PORT
# (the service's, 3000), CHAR_RNN_RETRAIN_INTERVAL (seconds between scheduled retrains; 120 here).
set -euo pipefail
# Job control: each command runs in a process group of its own, and the one in the foreground gets the
# terminal. Ctrl-C then reaches only that step (not make, not the servers in the background); the step ends
# with status 130, `set -e` ends the script, and `finish` stops everything it started and says goodbye.
# (Hence no `step || ...` for the foreground steps: the status of a step in such a list does not end it.)
set -m

# Your folder, as you named it (a leading ~ too, however it was quoted), from where you are.
if [[ -n ${CHAR_RNN_DATA:-} ]]; then
    [[ $CHAR_RNN_DATA != "~"* ]] || CHAR_RNN_DATA=$HOME${CHAR_RNN_DATA:1}
    CHAR_RNN_DATA=$(realpath -m -- "$CHAR_RNN_DATA")
    if [[ ! -e $CHAR_RNN_DATA ]]; then
        echo "make run: CHAR_RNN_DATA=$CHAR_RNN_DATA does not exist: create it and put your UTF-8 .txt files" \
            "in it, or leave CHAR_RNN_DATA unset to start with tiny Shakespeare" >&2
        exit 1
    fi
fi
cd "$(dirname "$0")/.."

export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false BENTOML_DO_NOT_TRACK=True
export CHAR_RNN_HOME=${CHAR_RNN_HOME:-$PWD/.char-rnn}
export PREFECT_HOME=${PREFECT_HOME:-$CHAR_RNN_HOME/prefect} BENTOML_HOME=${BENTOML_HOME:-$CHAR_RNN_HOME/bentoml}
export CHAR_RNN_DATA=${CHAR_RNN_DATA:-$CHAR_RNN_HOME/corpus}
export CHAR_RNN_RETRAIN_INTERVAL=${CHAR_RNN_RETRAIN_INTERVAL:-120}
export PREFECT_SERVER_API_PORT=${PREFECT_SERVER_API_PORT:-4200} CHAR_RNN_PORT=${CHAR_RNN_PORT:-3000}
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_SERVER_API_PORT/api
export PREFECT_RUNNER_POLL_FREQUENCY=2 OPENBLAS_NUM_THREADS=1
# The server stores events within a second (make run's screen shows each stage as it ends), and schedules two
# runs of the retrain ahead, not a hundred.
export PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL=${PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL:-1}
export PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS=${PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS:-2}
params=(--param "data_dir=$CHAR_RNN_DATA")
[[ -z ${STEPS:-} ]] || params+=(--param "steps=$STEPS")
[[ -z ${HIDDEN:-} ]] || params+=(--param "hidden=$HIDDEN")
PY=.venv/bin/python
LOGS=$CHAR_RNN_HOME/logs
SERVICE=http://127.0.0.1:$CHAR_RNN_PORT
mkdir -p "$LOGS"
[[ -e $CHAR_RNN_DATA ]] || mkdir -p "$CHAR_RNN_DATA"
if [[ -d $CHAR_RNN_DATA && -z $(ls -A "$CHAR_RNN_DATA") ]]; then
    cp data/tinyshakespeare.txt "$CHAR_RNN_DATA/"
    echo "Copied data/tinyshakespeare.txt into $CHAR_RNN_DATA (it was empty) to start with"
elif [[ -d $CHAR_RNN_DATA ]] && ! compgen -G "$CHAR_RNN_DATA/*.txt" >/dev/null; then
    echo "make run: no .txt file directly in $CHAR_RNN_DATA: the pipeline trains on the UTF-8 .txt files" \
        "directly in the folder; add some (or use an empty folder to start with tiny Shakespeare)" >&2
    exit 1
fi

pids=()  # the service, the Prefect server, the runner
following=  # the follower of the first run, while it runs
finish() {  # stop what this script started, then one line: goodbye (Ctrl-C, status 0) or what failed
    local status=$?
    trap - INT TERM EXIT
    trap '' PIPE  # the terminal (or a `| tee`) may be gone already: stop everything regardless
    set +e
    echo
    [[ -z ${following:-} ]] || kill -TERM -- "-$following" 2>/dev/null
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$pid" 2>/dev/null
    done
    if (( status == 0 || status == 130 || status == 143 )); then  # Ctrl-C (or kill): the way to stop it
        echo "Stopped the service, the runner and the Prefect server. Bye."
        exit $(( status == 143 ? 143 : 0 ))
    fi
    echo "make run failed (status $status); the logs are in $LOGS" >&2
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT  # between steps this script itself has the terminal
trap 'exit 143' TERM

# The service first: it needs no model to start (it serves the first one the moment it is promoted), and it
# starts while the Prefect server does.
echo "Starting the service (char-rnn serve; log $LOGS/service.log) and the Prefect server"
.venv/bin/char-rnn serve >"$LOGS/service.log" 2>&1 &
pids+=($!)
"$PY" -m prefect server start --host 127.0.0.1 >"$LOGS/prefect-server.log" 2>&1 &
pids+=($!)
if ! "$PY" -m prefect server status --wait --timeout 300 >/dev/null; then
    echo "the Prefect server did not come up at $PREFECT_API_URL; see $LOGS/prefect-server.log:" >&2
    tail -20 "$LOGS/prefect-server.log" >&2
    exit 1
fi

echo "Starting the deployments' runner (python -m flows.serve; log $LOGS/serve.log)"
# Both deployments train with these defaults, so a scheduled retrain warm-starts from what this run promotes.
"$PY" -m flows.serve "${params[@]}" >"$LOGS/serve.log" 2>&1 &
pids+=($!)

(  # a foreground job of its own, so that Ctrl-C ends it
    # Ctrl-C ends this loop even when it lands in a Python that exits with a plain status (say, while it is
    # shutting down): bash would take that as "the child handled it" and go on polling.
    trap 'exit 130' INT
    for _ in $(seq 240); do
        "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$SERVICE/livez" \
            2>/dev/null && exit 0
        kill -0 "${pids[0]}" 2>/dev/null || break
        sleep 0.5
    done
    echo "the service did not come up at $SERVICE; see $LOGS/service.log:" >&2
    tail -20 "$LOGS/service.log" >&2
    exit 1
)

# The message is printed by a foreground job that stays a moment after it, so that a Ctrl-C typed as soon as the
# message shows reaches a live process group (right after a job of its own ends, the terminal's foreground group
# can still be the finished job's, and a Ctrl-C then goes nowhere). A Ctrl-C ends the job with status 130, and
# `set -e` this script.
(
    trap 'exit 130' INT
    cat <<MSG

Everything is up. Ctrl-C stops it all.
  Playground      $SERVICE/   (shows the training below live, then writes with its model)
  Prefect UI      http://127.0.0.1:$PREFECT_SERVER_API_PORT
  Corpus folder   $CHAR_RNN_DATA  (drop a .txt file here: the scheduled retrain picks it up within ${CHAR_RNN_RETRAIN_INTERVAL} s)
  Models          .venv/bin/char-rnn models list   (and: models show TAG, models rollback)

Running the pipeline on $CHAR_RNN_DATA (the retrain deployment, now):
MSG
    sleep 2
)
# The run is followed in the background while a `sleep` a second at a time holds the foreground (see the end of
# this script): everything is up already, and a TERM must not wait for the first training to end.
"$PY" -m flows.follow char-rnn-pipeline/scheduled-retrain "${params[@]}" --runner-pid "${pids[2]}" &
following=$!
while kill -0 "$following" 2>/dev/null; do sleep 1; done
wait "$following"  # its status: `set -e` ends this script when the run did not complete
following=
(
    trap 'exit 130' INT
    cat <<MSG

The service serves the promoted model. Try:
  curl -s $SERVICE/generate -H 'content-type: application/json' -d '{"prompt": "ROMEO:", "seed": 1}'
MSG
    sleep 2
)
# Then wait a second at a time while both keep running: Ctrl-C ends a `sleep` (the foreground job), and with it
# this script; a TERM to this script runs its trap when the current `sleep` ends (bash runs a trap once its
# foreground job is done: one waiting job for good would hold a TERM off forever without a terminal).
while kill -0 "${pids[@]}" 2>/dev/null; do sleep 1; done
names=("the service" "the Prefect server" "the runner") logs=(service.log prefect-server.log serve.log)
for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    echo "${names[$i]} exited; see $LOGS/${logs[$i]}:" >&2
    tail -20 "$LOGS/${logs[$i]}" >&2
done
exit 1
