#!/usr/bin/env bash
# The retraining demo, beside a running `make run`: drop a new text file into the corpus folder, run the
# scheduled-retrain deployment now (the run the schedule would start within its interval, with the same
# parameters: it warm-starts from the promoted model for a few hundred steps and promotes the candidate only if
# it is better), follow it, then wait until the running service answers with the new model.
#   scripts/demo-retrain.sh [FILE]     (default: a few hundred lines of new text, with a few new characters)
#   scripts/demo-retrain.sh --next [FILE]   waits for the schedule's next run instead of starting one
# Environment as for scripts/run.sh: CHAR_RNN_HOME, CHAR_RNN_DATA, CHAR_RNN_PORT, PREFECT_SERVER_API_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false BENTOML_DO_NOT_TRACK=True
export CHAR_RNN_HOME=${CHAR_RNN_HOME:-$PWD/.char-rnn}
CHAR_RNN_DATA=${CHAR_RNN_DATA:-$CHAR_RNN_HOME/corpus}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_SERVER_API_PORT:-4200}/api
URL=http://127.0.0.1:${CHAR_RNN_PORT:-3000}
PY=.venv/bin/python
next=()
if [[ ${1:-} == --next ]]; then next=(--next); shift; fi

model() {  # the tag the service answers with
    "$PY" -c "import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + '/model_info', data=b'{}', headers={'content-type': 'application/json'})
print(json.load(urllib.request.urlopen(req, timeout=5))['model'])" "$URL"
}
current() {  # the promoted model, as `char-rnn models list --json` says
    .venv/bin/char-rnn models list --json | "$PY" -c "import json, sys; print(json.load(sys.stdin)['current'] or '')"
}

before=$(model) || { echo "no service answers at $URL: start it with 'make run' first" >&2; exit 1; }
start=$SECONDS
name=new-$(date +%Y%m%d-%H%M%S).txt
if [[ -n ${1:-} ]]; then
    cp "$1" "$CHAR_RNN_DATA/$name"
else
    # Mostly characters the model knows, a few it does not (É, « and », digits): the promotion gate scores
    # both models on the text the promoted one can read, so what is learnt of the new text must show there.
    for i in $(seq 300); do
        printf 'CÉLIA:\nAt the feast of the %d lanterns we sang « hey nonny » to the summer,\n' "$i"
        printf 'and the river answered.\n\n'
    done >"$CHAR_RNN_DATA/$name"
fi
echo "The service answers with $before; dropped $CHAR_RNN_DATA/$name"
# The retrain deployment's run, now (or, with --next, the schedule's next one). When a retrain is running
# already, its concurrency limit cancels the new run and this follows the running one instead.
"$PY" -m flows.follow "${next[@]}" char-rnn-pipeline/scheduled-retrain
now=$(current)
[[ $now != "$before" ]] || { echo "The retrain kept $before (the reason is above)" >&2; exit 1; }
for _ in $(seq 60); do
    [[ $(model 2>/dev/null || true) == "$now" ]] && break
    sleep 1
done
[[ $(model 2>/dev/null || true) == "$now" ]] || { echo "the service still answers with $before" >&2; exit 1; }
echo "The service answers with $now, $(( SECONDS - start )) s after the file was dropped. Two samples:"
"$PY" - "$URL" <<'PY'
import json, sys, urllib.request
body = {"prompt": "CÉLIA:\n", "max_new_chars": 160, "temperature": 0.5, "seed": 1, "num_samples": 2}
req = urllib.request.Request(
    sys.argv[1] + "/generate", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
)
print(*(body["prompt"] + c for c in json.load(urllib.request.urlopen(req, timeout=30))["completions"]), sep="\n---\n")
PY
