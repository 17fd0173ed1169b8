#!/usr/bin/env bash
# The retraining demo, beside a running `make run`: drop a new text file into the corpus folder, follow the
# next scheduled retrain (it trains a candidate from the promoted model and promotes it if it is better), then
# wait until the running service answers with the new model.
#   scripts/demo-retrain.sh [FILE]     (default: a few hundred lines of new text with new characters)
# Environment as for scripts/run.sh: CHAR_RNN_HOME, CHAR_RNN_DATA, CHAR_RNN_PORT, PREFECT_SERVER_API_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
export CHAR_RNN_HOME=${CHAR_RNN_HOME:-$PWD/.char-rnn}
CHAR_RNN_DATA=${CHAR_RNN_DATA:-$CHAR_RNN_HOME/corpus}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_SERVER_API_PORT:-4200}/api
URL=http://127.0.0.1:${CHAR_RNN_PORT:-3000}
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
echo "The service answers with $before; dropped $CHAR_RNN_DATA/$name"
# The next scheduled retrain, as it runs (the schedule's interval comes from the Prefect server).
"$PY" -m flows.follow --next char-rnn-pipeline/scheduled-retrain
current=$(.venv/bin/char-rnn models list | awk '$1 == "*" {print $2}')
[[ $current != "$before" ]] || { echo "The retrain kept $before (the reason is above)" >&2; exit 1; }
for _ in $(seq 60); do
    now=$(model 2>/dev/null || true)
    if [[ -n $now && $now != "$before" ]]; then
        echo "The service answers with $now:"
        break
    fi
    sleep 1
done
[[ -n $now && $now != "$before" ]] || { echo "the service still answers with $before" >&2; exit 1; }
"$PY" - "$URL" <<'PY'
import json, sys, urllib.request
body = json.dumps({"prompt": "CÉLIA:\n", "max_new_chars": 200, "seed": 1}).encode()
req = urllib.request.Request(sys.argv[1] + "/generate", data=body, headers={"content-type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=30))["completions"][0])
PY
