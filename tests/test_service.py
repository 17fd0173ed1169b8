"""The service's HTTP face, in-process: Starlette's TestClient over the BentoML ASGI app.

One app per test process (module-scoped). The registry's history file is redirected to one of this module's
own, so the service sees exactly the models these tests promote (none at first, for the 503 test).
"""

import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ["CHAR_RNN_RELOAD_INTERVAL"] = "0.1"  # before `service` is imported

from model import sample
from model.checkpoint import Checkpoint
from model.config import ModelConfig, TrainConfig
from model.train import train
from model.vocab import Vocab
from registry import Registry

ROOT = Path(__file__).resolve().parent.parent
# combining marks after letters that have no precomposed form with them
EXTRA = "\nCafé — naïve, déjà vu: “quoted” ½ ☃ 日本語. Q\u0303 q\u0303 x\u0301.\n"


def tiny_checkpoint(text: str, out: Path, seed: int = 0) -> Checkpoint:
    """A one-layer hidden-16 model trained for a few steps on `text`."""
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    cut = len(ids) * 9 // 10
    cfg = ModelConfig(vocab_size=len(vocab), hidden=16, layers=1, dropout=0.0)
    tc = TrainConfig(steps=10, batch=4, seq=16, warmup=0, eval_every=10, checkpoint_every=10, seed=seed)
    return train(ids[:cut], ids[cut:], vocab, cfg, tc, out, fingerprint=f"test-{seed}")


def events(chunks) -> list[tuple[str, dict]]:
    """Server-sent events as (event name, data): "message" when unnamed."""
    out = []
    for block in "".join(chunks).split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def expected(ck: Checkpoint, prompt: str, n: int, temp: float, seed: int, samples: int = 1) -> list[str]:
    """What the service must answer for a seeded request, computed directly (unbatched)."""
    rows = [sample.Settings(temp, seed=seed + i * 2**32) for i in range(samples)]
    return sample.sample(ck.params, ck.config, ck.vocab, [prompt] * samples, n, rows)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """The session's model store, with a history file of this module's own."""
    found = Registry(Path(os.environ["BENTOML_HOME"]))
    found.pointer = tmp_path_factory.mktemp("registry") / "promoted.json"
    return found


@pytest.fixture(scope="module")
def client(registry):
    from starlette.testclient import TestClient

    import service

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(service, "open_registry", lambda: registry)
        with TestClient(service.CharRNN.to_asgi()) as c:
            yield c


@pytest.fixture(scope="module")
def model(client, registry, tmp_path_factory, small_text) -> tuple[str, Checkpoint]:
    """A promoted tiny model, once the service serves it."""
    ck = tiny_checkpoint(small_text + EXTRA, tmp_path_factory.mktemp("run") / "checkpoints")
    tag = registry.promote(ck.path, {"source": "tests"}).tag
    wait_serving(client, tag)
    return tag, ck


def wait_serving(client, tag: str) -> None:
    for _ in range(100):
        r = client.post("/model_info")
        if r.status_code == 200 and r.json()["model"] == tag:
            return
        time.sleep(0.05)
    pytest.fail(f"the service did not pick up {tag}")


def test_without_a_model_it_starts_unready_and_answers_503_saying_how_to_train(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 503
    for route in ("/generate", "/generate_stream"):
        r = client.post(route, json={"prompt": "a"})
        assert r.status_code == 503
        assert "char-rnn pipeline" in r.json()["error"]
        assert "Traceback" not in r.text
    assert client.post("/model_info").status_code == 503
    assert client.post("/models").json() == {"serving": None, "history": [], "curve": None}


def test_ready_with_model_info(client, model):
    tag, ck = model
    assert client.get("/readyz").status_code == 200
    info = client.post("/model_info").json()
    assert info["model"] == tag
    assert info["vocab"] == list(ck.vocab.chars)
    assert info["config"]["hidden"] == 16
    assert info["val_loss"] == pytest.approx(ck.meta.metrics["val_loss"])
    assert info["fingerprint"] == "test-0" and info["trained_at"] and info["step"] == 10


def test_defaults(client, model):
    r = client.post("/generate", json={})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model[0] and body["skipped_chars"] == [] and body["elapsed_ms"] > 0
    assert [len(c) for c in body["completions"]] == [200]


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_chars", 1),
        ("max_new_chars", 2000),
        ("temperature", 0.05),
        ("temperature", 5),
        ("top_k", 1),
        ("top_p", 1),
        ("top_p", 1e-9),
        ("seed", 0),
        ("seed", 2**32 - 1),
        ("num_samples", 16),
        ("prompt", ""),
        ("prompt", "a" * 2000),
        ("unknown_chars", "skip"),
    ],
)
def test_bounds_accepted(client, model, field, value):
    r = client.post("/generate", json={"max_new_chars": 5, field: value})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "field,value,rule",
    [
        ("max_new_chars", 0, "greater_than_equal"),
        ("max_new_chars", 2001, "less_than_equal"),
        ("temperature", 0.04, "greater_than_equal"),
        ("temperature", 5.01, "less_than_equal"),
        ("top_k", 0, "greater_than_equal"),
        ("top_p", 0, "value_error"),
        ("top_p", -0.5, "value_error"),
        ("top_p", 1.01, "less_than_equal"),
        ("seed", -1, "greater_than_equal"),
        ("seed", 2**32, "less_than_equal"),
        ("num_samples", 0, "greater_than_equal"),
        ("num_samples", 17, "less_than_equal"),
        ("prompt", "a" * 2001, "string_too_long"),
        ("unknown_chars", "ignore", "literal_error"),
        ("max_new_chars", "10", "int_type"),
        ("max_new_chars", 10.5, "int_type"),
        ("max_new_chars", True, "int_type"),
        ("temperature", "hot", "float_type"),
        ("prompt", 42, "string_type"),
        ("prompt", None, "string_type"),
        ("seed", 1.0, "int_type"),
        ("num_samples", [1], "int_type"),
    ],
)
def test_invalid_fields_are_400_naming_field_and_rule(client, model, field, value, rule):
    r = client.post("/generate", json={field: value})
    assert r.status_code == 400, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == [field] and err["type"] == rule and err["msg"]


def test_unknown_fields_are_forbidden(client, model):
    r = client.post("/generate", json={"prompt": "a", "length": 5})
    assert r.status_code == 400
    assert r.json()["detail"][0] == r.json()["detail"][0] | {"loc": ["length"], "type": "extra_forbidden"}


@pytest.mark.parametrize(
    "body,content_type,status",
    [
        (b"", "application/json", 400),
        (b"   ", "application/json", 400),
        (b"{", "application/json", 400),
        (b"null", "application/json", 400),
        (b"[]", "application/json", 400),
        (b'"prompt"', "application/json", 400),
        (b'{"temperature": NaN}', "application/json", 400),
        (b'{"prompt": "\\ud800"}', "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b'{"prompt": "a"}', None, 200),
        (b"prompt=a", "application/x-www-form-urlencoded", 415),
        (b"--x\r\n\r\nhi\r\n--x--", "multipart/form-data; boundary=x", 415),
        (b'{"prompt": "a"}', "text/plain", 415),
        (b"\x80\x04\x95", "application/vnd.bentoml+pickle", 415),
        (b'{"prompt": "' + b"a" * 100_000 + b'"}', "application/json", 413),
    ],
)
def test_malformed_bodies_of_any_content_type_are_4xx_with_json(client, model, body, content_type, status):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/generate", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()


def test_other_methods_and_routes_are_4xx(client, model):
    assert client.get("/generate").status_code == 405
    assert client.post("/nope", json={}).status_code == 404


def test_unknown_prompt_characters_are_listed_or_skipped(client, model):
    r = client.post("/generate", json={"prompt": "ROMEO ✈ 🙂 ✈", "max_new_chars": 3})
    assert r.status_code == 400
    [err] = r.json()["detail"]
    assert err["loc"] == ["prompt"] and err["type"] == "unknown_chars" and err["chars"] == ["✈", "🙂"]
    r = client.post("/generate", json={"prompt": "ROMEO ✈ 🙂 ✈", "max_new_chars": 3, "unknown_chars": "skip"})
    assert r.status_code == 200 and r.json()["skipped_chars"] == ["✈", "🙂"]


def test_unicode_prompts_are_nfc_normalised(client, model):
    tag, ck = model
    decomposed = unicodedata.normalize("NFD", "Café naïve 日本語")
    assert decomposed != "Café naïve 日本語"
    r = client.post("/generate", json={"prompt": decomposed, "max_new_chars": 30, "seed": 5})
    assert r.status_code == 200, r.text
    assert r.json()["completions"] == expected(ck, "Café naïve 日本語", 30, 0.8, 5)
    assert set("".join(r.json()["completions"])) <= set(ck.vocab.chars)


def test_seed_reproducible_and_equal_to_unbatched_sampling(client, model):
    tag, ck = model
    req = {"prompt": "ROMEO:", "max_new_chars": 80, "seed": 7, "temperature": 1.2, "num_samples": 3}
    first = client.post("/generate", json=req).json()
    assert client.post("/generate", json=req).json()["completions"] == first["completions"]
    assert first["completions"] == expected(ck, "ROMEO:", 80, 1.2, 7, samples=3)
    assert len(set(first["completions"])) == 3  # each sample draws its own stream
    unseeded = [client.post("/generate", json=req | {"seed": None}).json()["completions"] for _ in range(3)]
    assert len({tuple(c) for c in unseeded}) == 3


def test_concurrent_requests_batched_give_the_same_answers(client, model):
    tag, ck = model
    reqs = [
        {"prompt": "ab"[: i % 3] + "MEN", "max_new_chars": 20 + 7 * i, "seed": i, "temperature": 0.5 + i / 10}
        for i in range(24)
    ]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda r: client.post("/generate", json=r), reqs))
    for req, r in zip(reqs, got, strict=True):
        assert r.status_code == 200, r.text
        want = expected(ck, req["prompt"], req["max_new_chars"], req["temperature"], req["seed"])
        assert r.json()["completions"] == want and r.json()["model"] == tag


def test_top_k_and_top_p(client, model):
    tag, ck = model
    r = client.post("/generate", json={"prompt": "A", "max_new_chars": 50, "top_k": 1, "temperature": 3})
    greedy = client.post("/generate", json={"prompt": "A", "max_new_chars": 50, "top_p": 1e-9}).json()
    assert r.json()["completions"] == greedy["completions"]  # both keep only the most likely character


def test_stream_sends_the_same_characters_as_generate(client, model):
    tag, ck = model
    req = {"prompt": "MENENIUS", "max_new_chars": 60, "seed": 3}
    with client.stream("POST", "/generate_stream", json=req) as r:
        assert r.status_code == 200 and r.headers["x-model-tag"] == tag
        assert r.headers["content-type"].startswith("text/event-stream")
        got = events(r.iter_text())
    text = "".join(data["text"] for name, data in got[:-1] if name == "message")
    assert got[-1] == ("done", {"model": tag, "chars": 60})
    assert [text] == expected(ck, "MENENIUS", 60, 0.8, 3)
    assert client.post("/generate", json=req).json()["completions"] == [text]


def test_stream_validates_like_generate(client, model):
    assert client.post("/generate_stream", json={"temperature": 0}).status_code == 400
    r = client.post("/generate_stream", json={"num_samples": 2})
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["num_samples"]
    assert client.post("/generate_stream", json={"prompt": "✈"}).json()["detail"][0]["chars"] == ["✈"]


def test_openapi_documents_the_request_bounds(client, model):
    spec = client.get("/docs.json").json()
    assert {"/generate", "/generate_stream", "/model_info"} <= set(spec["paths"])
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False
    fields = body["properties"]
    assert fields["max_new_chars"]["maximum"] == 2000 and fields["temperature"]["minimum"] == 0.05


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_bodies_never_get_a_5xx(client, model, mode):
    """Schemathesis draws bodies from the published OpenAPI schema, valid then invalid: never a 5xx, and
    every response (status, content type, body) conforms to the schema."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.core import NotSet
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_dict(client.get("/docs.json").json())
    strategy = schema["/generate"]["POST"].as_strategy(generation_mode=GenerationMode(mode))

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        body = b"" if isinstance(case.body, NotSet) else case.body
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post("/generate", content=content, headers={"content-type": case.media_type or ""})
        assert r.status_code < 500 and r.json(), r.text
        # The prompt's alphabet is the served model's vocabulary, which changes on hot reload, so the schema
        # cannot state it: a schema-valid prompt may be refused (400, naming the characters).
        case.validate_response(r, excluded_checks=[positive_data_acceptance])

    check()


def test_a_request_past_its_deadline_gets_504_not_500(client, model, monkeypatch):
    import service

    monkeypatch.setattr(service, "S", service.S.model_copy(update={"timeout": 0.0}))
    r = client.post("/generate", json={"max_new_chars": 2000})
    assert r.status_code == 504 and "longer than" in r.json()["error"]
    monkeypatch.undo()
    assert client.post("/generate", json={"max_new_chars": 5}).status_code == 200


def test_a_stream_that_times_out_says_so_in_its_last_event(client, model, monkeypatch):
    import service

    monkeypatch.setattr(service, "S", service.S.model_copy(update={"timeout": 0.0}))
    with client.stream("POST", "/generate_stream", json={"max_new_chars": 2000}) as r:
        assert r.status_code == 200
        got = events(r.iter_text())
    name, data = got[-1]
    assert name == "error" and data["status"] == 504 and "longer than" in data["error"]
    assert data["chars"] < 2000 and all(n == "message" for n, _ in got[:-1])


def test_the_models_own_output_is_accepted_back_as_a_prompt(client, model):
    """Completions hold combining marks after letters that NFC composes into characters the vocabulary lacks
    ("a" + U+0303 -> "ã"); a prompt spells those through their decomposed form."""
    tag, ck = model
    assert "\u0303" in ck.vocab and "ã" not in ck.vocab
    assert client.post("/generate", json={"prompt": "ã ñ", "max_new_chars": 5}).status_code == 200
    r = client.post("/generate", json={"max_new_chars": 300, "temperature": 5, "seed": 1, "num_samples": 16})
    completions = r.json()["completions"]
    assert any(unicodedata.normalize("NFC", c) != c for c in completions)  # the case is exercised
    for c in completions:
        back = client.post("/generate", json={"prompt": c, "max_new_chars": 5})
        assert back.status_code == 200, back.text


def test_the_playground_and_docs_pages_come_from_this_service_alone(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert {"playground.js", "playground.css", "docs"} <= set(links)
    assert all(not re.match(r"[a-z]+://|//", link) for link in links), links  # nothing from other hosts
    for asset, kind in (("/playground.js", "text/javascript"), ("/playground.css", "text/css")):
        r = client.get(asset)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.text
    assert "swagger-ui" in client.get("/docs").text


def test_models_view_lists_the_history_with_labels_and_the_served_curve(client, model, registry):
    tag, ck = model
    view = client.post("/models").json()
    assert view["serving"] == tag
    [row] = [r for r in view["history"] if r["tag"] == tag]
    assert row["serving"] and row["action"] == "promote" and row["promoted_at"] == row["at"]
    assert row["val_loss"] is None and row["parent"] is None  # promoted with no such labels
    assert view["curve"] == {"train": ck.meta.metrics["train"], "val": ck.meta.metrics["val"]}
    other = registry.promote(ck.path, {"val_loss": "1.25", "corpus_chars": "123", "run_id": "r1"}).tag
    try:
        wait_serving(client, other)
        *_, before, last = client.post("/models").json()["history"]
        assert (before["tag"], before["serving"]) == (tag, False)
        assert (last["tag"], last["serving"], last["run_id"]) == (other, True, "r1")
        assert (last["val_loss"], last["corpus_chars"]) == (1.25, 123)
    finally:
        registry.rollback(tag, "back to the module's model")
    wait_serving(client, tag)
    assert client.post("/models").json()["history"][-1] | {"at": ""} == {
        **row,
        "at": "",
        "action": "rollback",
        "reason": "back to the module's model",
    }


@pytest.mark.parametrize("route", ["/model_info", "/models"])
def test_routes_without_input_take_no_body_or_an_empty_object(client, model, route):
    assert client.post(route).status_code == 200
    assert client.post(route, json={}).status_code == 200
    for body, rule in (([1], "model_type"), ({"prompt": "a"}, "extra_forbidden")):
        r = client.post(route, json=body)
        assert r.status_code == 400 and r.json()["detail"][0]["type"] == rule
        assert "pydantic" not in r.text and "error for Input" not in r.text  # as BentoML would say


def test_metrics_count_every_generation_step_the_thread_reported():
    """The generation thread reports steps as plain counts; a flush adds them to the counters behind
    `char_rnn_batch_rows`, which /metrics shows as that histogram, the other families left as they are."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import Metrics, histogram

    reg = CollectorRegistry()
    m = Metrics(registry=reg)
    m.start()
    try:
        for rows, n in ((1, 5), (3, 7), (64, 2), (65, 1), (5000, 3)):
            for _ in range(n):
                m.step(rows)
        m.flush()  # (the flusher thread may have taken some already)
        m.flush()  # nothing new
        m.request("/generate", 200)
        exposed = generate_latest(reg).decode()
    finally:
        m.stop()
    shown = histogram(exposed)
    families = {f.name: f for f in text_string_to_metric_families(shown)}
    assert families["char_rnn_batch_rows"].type == "histogram"
    assert not {"char_rnn_batch_steps", "char_rnn_batch_rows_computed"} & set(families)
    value = {(s.name, s.labels.get("le")): s.value for s in families["char_rnn_batch_rows"].samples}
    assert value[("char_rnn_batch_rows_count", None)] == 18
    assert value[("char_rnn_batch_rows_sum", None)] == 5 + 21 + 128 + 65 + 15000
    buckets = {le: value[("char_rnn_batch_rows_bucket", le)] for le in ("1.0", "2.0", "4.0", "64.0", "+Inf")}
    assert buckets == {"1.0": 5, "2.0": 5, "4.0": 12, "64.0": 14, "+Inf": 18}
    requests = [line for line in exposed.splitlines() if line.startswith("char_rnn_requests")]
    assert requests and set(requests) <= set(shown.splitlines())  # the others as they were


def test_importing_the_service_loads_no_model_and_reads_no_registry(tmp_path):
    """`import service` only declares the service: with every way to the registry and the model store made
    to fail loudly, and BENTOML_HOME a file that no store can live in, the import succeeds."""
    probe = """
import bentoml, model.checkpoint, registry

def loud(*args, **kwargs):
    raise SystemExit("touched at import")

registry.Registry.__init__ = loud
model.checkpoint.load_dir = model.checkpoint.load = loud
bentoml.models.get = bentoml.models.list = loud
import service
print("declared", service.CharRNN.name, sorted(service.CharRNN.apis))
"""
    (tmp_path / "bentoml").write_text("not a folder")
    env = os.environ | {"CHAR_RNN_HOME": str(tmp_path), "BENTOML_HOME": str(tmp_path / "bentoml")}
    env.pop("CHAR_RNN_RELOAD_INTERVAL", None)
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    declared = "['generate', 'generate_stream', 'model_info', 'models', 'training']"
    assert f"declared char_rnn {declared}" in out.stdout


@pytest.mark.parametrize(
    "api_key,metrics_key,needed",
    [(None, None, None), ("a", None, "a"), (None, "m", "m"), ("a", "m", "m")],
)
def test_the_metrics_need_the_metrics_key_else_the_api_key_else_none(
    monkeypatch, api_key, metrics_key, needed
):
    """The rule of `/metrics`: its own key when set; else the API key when that is set; else open."""
    from pydantic import SecretStr

    import service

    keys = {k: SecretStr(v) if v else None for k, v in (("api_key", api_key), ("metrics_key", metrics_key))}
    monkeypatch.setattr(service, "S", service.S.model_copy(update=keys))
    got = service.keys()
    assert (got["/metrics"] and got["/metrics"].secret) == needed
    assert {route: key and key.secret for route, key in got.items() if route != "/metrics"} == dict.fromkeys(
        ("/generate", "/generate_stream", "/model_info", "/models", "/training"), api_key
    )


def test_a_run_whose_trainer_is_gone_shows_as_stopped(tmp_path):
    """/training's view: a run that says it trains, but whose process on this host has ended (or, on another
    host, has said nothing for QUIET seconds), is shown stopped; a live one as it says."""
    import socket
    import subprocess

    from serving import progress

    gone = subprocess.Popen(["true"])
    gone.wait()
    here, old = socket.gethostname(), "2000-01-01T00:00:00+00:00"
    cases = [
        ({"host": here, "pid": os.getpid()}, "training"),
        ({"host": here, "pid": gone.pid}, "stopped"),
        ({"host": here, "pid": 0}, "stopped"),
        (
            {
                "host": "elsewhere",
                "pid": os.getpid(),
                "updated_at": progress.datetime.now(progress.UTC).isoformat(),
            },
            "training",
        ),
        ({"host": "elsewhere", "pid": os.getpid(), "updated_at": old}, "stopped"),
    ]
    for i, (doc, state) in enumerate(cases):
        run = tmp_path / f"runs-{i}" / "run-x"
        run.mkdir(parents=True)
        (run / "progress.json").write_text(json.dumps({"state": "training", "step": 3, "steps": 9} | doc))
        assert progress.view(run.parent, None).state == state, doc
