#!/usr/bin/env bash
# The retraining demo, beside a running `make run`: drop a new text file into the corpus folder, then watch the
# scheduled retrain train a candidate, promote it if it is better, and the running service switch to it.
#   scripts/demo-retrain.sh [FILE]     (default: a few hundred lines of new text with new characters)
# Environment as for scripts/run.sh: CHAR_RNN_HOME, CHAR_RNN_DATA, SERVICE_PORT; TIMEOUT (s, 900).
set -euo pipefail
cd "$(dirname "$0")/.."
CHAR_RNN_HOME=${CHAR_RNN_HOME:-$PWD/.char-rnn}
CHAR_RNN_DATA=${CHAR_RNN_DATA:-$CHAR_RNN_HOME/corpus}
URL=http://127.0.0.1:${SERVICE_PORT:-3000}
PY=.venv/bin/python

model() {  # the tag the service answers with
    "$PY" -c "import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + '/model_info', data=b'{}', headers={'content-type': 'application/json'})
print(json.load(urllib.request.urlopen(req, timeout=5))['model'])" "$URL"
}

before=$(model) || { echo "no service answers at $URL: start it with 'make run' first" >&2; exit 1; }
name=new-$(date +%Y%m%d-%H%M%S).txt
if [[ -n ${1:-} ]]; then
    cp "$1" "$CHAR_RNN_DATA/$name"
else
    for i in $(seq 300); do
        printf 'CÉLIA:\nÀ la fête, %d élèves chantèrent « ô gué » — naïve œuvre d’été!\n\n' "$i"
    done >"$CHAR_RNN_DATA/$name"
fi
echo "service answers with $before; dropped $CHAR_RNN_DATA/$name"
echo "waiting for the scheduled retrain (every \$CHAR_RNN_RETRAIN_INTERVAL s) to promote a better model..."
start=$(date +%s)
while :; do
    now=$(model 2>/dev/null || true)
    if [[ -n $now && $now != "$before" ]]; then
        echo "after $(( $(date +%s) - start )) s the service answers with $now"
        break
    fi
    if (( $(date +%s) - start > ${TIMEOUT:-900} )); then
        echo "no new model after ${TIMEOUT:-900} s: see the Prefect UI, or $CHAR_RNN_HOME/logs/serve.log" >&2
        exit 1
    fi
    sleep 5
done
"$PY" - "$URL" <<'PY'
import json, sys, urllib.request
body = json.dumps({"prompt": "CÉLIA:\n", "max_new_chars": 200, "seed": 1}).encode()
req = urllib.request.Request(sys.argv[1] + "/generate", data=body, headers={"content-type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=30))["completions"][0])
PY
