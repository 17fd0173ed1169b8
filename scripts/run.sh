#!/usr/bin/env bash
# `make run`: the whole product on this machine. Starts a local Prefect server, the process that runs the
# deployments, runs the pipeline deployment on the corpus folder, then serves the promoted model with BentoML.
# Ctrl-C stops everything it started. Running it again reuses what is there (cached encoding, finished
# checkpoints, the promoted model).
#
# Environment: CHAR_RNN_HOME (./.char-rnn), CHAR_RNN_DATA (corpus folder, $CHAR_RNN_HOME/corpus, seeded with
# data/tinyshakespeare.txt), STEPS and HIDDEN (default: the model's and training's own defaults),
# PREFECT_SERVER_PORT (4200), CHAR_RNN_PORT (the service's, 3000), CHAR_RNN_RETRAIN_INTERVAL (seconds between
# scheduled retrains; 120 here).
set -euo pipefail
set -m  # each background job gets its own process group: Ctrl-C reaches only this script, which stops them
cd "$(dirname "$0")/.."

export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false BENTOML_DO_NOT_TRACK=True
export CHAR_RNN_HOME=${CHAR_RNN_HOME:-$PWD/.char-rnn}
export PREFECT_HOME=${PREFECT_HOME:-$CHAR_RNN_HOME/prefect} BENTOML_HOME=${BENTOML_HOME:-$CHAR_RNN_HOME/bentoml}
export CHAR_RNN_DATA=${CHAR_RNN_DATA:-$CHAR_RNN_HOME/corpus}
export CHAR_RNN_RETRAIN_INTERVAL=${CHAR_RNN_RETRAIN_INTERVAL:-120}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_SERVER_PORT:-4200}/api
export PREFECT_RUNNER_POLL_FREQUENCY=2 OPENBLAS_NUM_THREADS=1
SERVICE_PORT=${CHAR_RNN_PORT:-${SERVICE_PORT:-3000}}
params=(--param "data_dir=$CHAR_RNN_DATA")
[[ -z ${STEPS:-} ]] || params+=(--param "steps=$STEPS")
[[ -z ${HIDDEN:-} ]] || params+=(--param "hidden=$HIDDEN")
PY=.venv/bin/python
LOGS=$CHAR_RNN_HOME/logs
mkdir -p "$LOGS" "$CHAR_RNN_DATA"
[[ -n $(ls -A "$CHAR_RNN_DATA") ]] || cp data/tinyshakespeare.txt "$CHAR_RNN_DATA/"

pids=()
stop_all() {
    trap - INT TERM EXIT
    trap '' PIPE  # the terminal (or a `| tee`) may be gone already: stop everything regardless
    set +e
    echo; echo "stopping..."
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    scripts/prefect-server.sh stop
}
trap stop_all INT TERM EXIT

wait_http() {  # URL SECONDS NAME LOG
    for _ in $(seq "$(( $2 * 2 ))"); do
        "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null &&
            return 0
        sleep 0.5
    done
    echo "$3 did not come up at $1; see $4" >&2
    tail -20 "$4" >&2
    return 1
}

scripts/prefect-server.sh start

echo "starting the deployments' runner (python -m flows.serve, log $LOGS/serve.log)"
# Both deployments train with these defaults, so a scheduled retrain warm-starts from what this run promotes.
"$PY" -m flows.serve "${params[@]}" >"$LOGS/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
    .venv/bin/prefect deployment inspect 'char-rnn-pipeline/on-demand' >/dev/null 2>&1 && break
    kill -0 "${pids[-1]}" 2>/dev/null || { tail -20 "$LOGS/serve.log" >&2; exit 1; }
    sleep 1
done

echo "running the pipeline on $CHAR_RNN_DATA (${params[*]})"
# only_if_changed: a second `make run` on the same corpus reuses the promoted model instead of training again.
.venv/bin/prefect deployment run 'char-rnn-pipeline/on-demand' --param only_if_changed=true --watch

echo "starting the service (char-rnn serve, log $LOGS/service.log)"
.venv/bin/char-rnn serve --port "$SERVICE_PORT" >"$LOGS/service.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$SERVICE_PORT/readyz" 120 "the service" "$LOGS/service.log"

cat <<MSG

Everything is up. Ctrl-C stops it all.
  Prefect UI      http://127.0.0.1:${PREFECT_SERVER_PORT:-4200}
  Service docs    http://127.0.0.1:$SERVICE_PORT
  Corpus folder   $CHAR_RNN_DATA  (drop a .txt file here: the scheduled retrain picks it up within ${CHAR_RNN_RETRAIN_INTERVAL}s)

Try:
  curl -s -X POST http://127.0.0.1:$SERVICE_PORT/generate -H 'content-type: application/json' \\
       -d '{"prompt": "ROMEO:", "max_new_chars": 200, "seed": 1}'
MSG
wait "${pids[@]}"
