#!/usr/bin/env bash
# Start, stop or check a local Prefect server on 127.0.0.1 with a project-local PREFECT_HOME.
#   scripts/prefect-server.sh start|stop|status
# Environment: CHAR_RNN_HOME (default ./.char-rnn), PREFECT_HOME (default $CHAR_RNN_HOME/prefect),
#   PREFECT_SERVER_API_PORT (default 4200: Prefect's own setting, which moves the API and the address the UI
#   calls together; `prefect server start --port` alone would leave the UI calling :4200),
#   PYTHON (default .venv/bin/python, else `uv run python`).
#   PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS (default 2 here): future runs created per schedule; Prefect's
#   default makes an hour's worth at least (30 for a retrain every 2 minutes), which fills the UI.
set -euo pipefail
trap 'exit 130' INT  # Ctrl-C ends the wait below even when it lands in a Python that exits with a plain status
cd "$(dirname "$0")/.."

export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false BENTOML_DO_NOT_TRACK=True
CHAR_RNN_HOME=${CHAR_RNN_HOME:-$PWD/.char-rnn}
export PREFECT_HOME=${PREFECT_HOME:-$CHAR_RNN_HOME/prefect}
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=${PREFECT_SERVER_API_PORT:-4200}
export PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS=${PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS:-2}
URL="http://127.0.0.1:$PREFECT_SERVER_API_PORT/api"
PIDFILE=$PREFECT_HOME/server.pid
LOG=$PREFECT_HOME/server.log
if [[ -n ${PYTHON:-} ]]; then read -ra PY <<<"$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=(.venv/bin/python)
else PY=(uv run --frozen python); fi

running() { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
hint() {  # how to point this shell's Prefect commands at the server, unless they already are
    [[ ${PREFECT_API_URL:-} == "$URL" ]] || echo "To use it from this shell: export PREFECT_API_URL=$URL"
}

case ${1:-} in
start)
    if running; then echo "Prefect server already running (PID $(cat "$PIDFILE")) at $URL"; hint; exit 0; fi
    mkdir -p "$PREFECT_HOME"
    # A new database is made first: parallel first runs on it would race (the server migrates existing ones).
    : >"$LOG"
    [[ -f $PREFECT_HOME/prefect.db ]] || PREFECT_API_URL= "${PY[@]}" -m prefect server database upgrade -y >>"$LOG" 2>&1
    # Its own session, so `stop` ends the server and the services it spawns together. No PREFECT_API_URL: the UI
    # then calls the API at PREFECT_SERVER_API_HOST:PREFECT_SERVER_API_PORT.
    PREFECT_API_URL= setsid "${PY[@]}" -m prefect server start >>"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    while (( SECONDS < 300 )); do  # a busy machine: several minutes
        if "${PY[@]}" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=1)" \
            "$URL" 2>/dev/null; then
            echo "Prefect server up at $URL (PID $(cat "$PIDFILE"), log $LOG)"
            hint
            exit 0
        fi
        running || { echo "the server exited; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
        sleep 0.5
    done
    echo "the server did not answer at $URL within $SECONDS s; see $LOG (stop it with $0 stop)" >&2
    exit 1
    ;;
stop)
    if ! running; then echo "Prefect server not running"; rm -f "$PIDFILE"; exit 0; fi
    pid=$(cat "$PIDFILE")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
    rm -f "$PIDFILE"
    echo "Prefect server stopped (PID $pid)"
    ;;
status)
    if running; then echo "running (PID $(cat "$PIDFILE")) at $URL"; else echo "not running"; exit 1; fi
    ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
