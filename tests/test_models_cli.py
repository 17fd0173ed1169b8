"""`char-rnn models list|show|rollback` over the registry, and what the pipeline does after a rollback.

The rollback as a running service sees it (zero failed requests) is in test_service_http.py, beside the
promotions under load."""

import json
import re
from pathlib import Path

import pytest
from test_flows import TINY
from test_service import tiny_checkpoint

from cli import main
from flows.pipeline import pipeline
from registry import Registry, Verdict


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_text) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [tiny_checkpoint(small_text[:4000], root / f"m{i}", seed=i).path for i in range(3)]


@pytest.fixture
def reg(tmp_path, monkeypatch) -> Registry:
    """The registry `char-rnn` sees in this test (its history file under the test's own BENTOML_HOME)."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    return Registry(tmp_path / "bentoml")


def promote_all(reg: Registry, models: list[Path]) -> list[str]:
    labels = [
        {"val_loss": f"{2 - i / 10:.6f}", "fingerprint": f"{i}" * 64, "corpus_chars": "4000"}
        for i in range(3)
    ]
    tags = [reg.promote(models[0], labels[0]).tag]
    for m, lab in zip(models[1:], labels[1:], strict=True):
        tags.append(reg.promote(m, lab | {"parent": tags[-1]}, judge=lambda c: Verdict(True, "better")).tag)
    return tags


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rollback_without_a_tag_goes_one_model_back_in_promotion_order(reg, models):
    a, b, c = promote_all(reg, models)
    assert reg.rollback(reason="c is worse").tag == b and reg.current().tag == b
    assert reg.rollback().tag == a and reg.current().tag == a
    with pytest.raises(ValueError, match="no model promoted before the current one"):
        reg.rollback()
    with pytest.raises(ValueError, match="is the current model already"):
        reg.rollback(a)
    assert reg.rollback(c, "forward again").tag == c  # any promoted model, newer ones too
    assert (
        reg.rolled_back_from(a) == [b] and reg.rolled_back_from(b) == [c] and reg.rolled_back_from(c) == [a]
    )
    assert [(e.tag, e.action) for e in reg.history()][-3:] == [
        (b, "rollback"),
        (a, "rollback"),
        (c, "rollback"),
    ]


def test_models_list_show_and_rollback_on_the_command_line(reg, models, capsys):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "no promoted model" in out and "trains one" in out
    a, b, c = promote_all(reg, models)

    code, out, _ = run(capsys, "models", "list")
    header, *rows, legend = out.splitlines()
    assert code == 0 and header.split() == ["TAG", "PROMOTED", "AT", "VAL", "LOSS", "PARENT", "FINGERPRINT"]
    assert [r.split()[0] for r in rows] == [a, b, "*"] and rows[2].split()[1] == c
    assert rows[0].split()[3:] == ["2.0000", "-", "0" * 12] and rows[1].split()[4] == a
    assert legend.startswith("* serves")

    code, out, _ = run(capsys, "models", "rollback", "--reason", "c writes nonsense")
    assert code == 0 and out.startswith(f"{b} is the current model again (instead of {c}): c writes nonsense")
    assert reg.current().tag == b and reg.history()[-1].reason == "c writes nonsense"
    code, out, _ = run(capsys, "models", "list")
    assert (
        f"*  {b}" in out and f"rolled back to {b} at " in out and out.rstrip().endswith("c writes nonsense")
    )

    code, out, _ = run(capsys, "models", "show", c.split(":")[1])  # the version alone will do
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines()[1:10])
    assert code == 0 and out.splitlines()[0] == c
    assert fields["serves"] == "no" and fields["parent"] == b and fields["fingerprint"] == "2" * 64
    assert fields["val loss"].startswith("1.8000 nats/char") and fields["corpus"] == "4,000 characters"
    assert "promote   better" in out and "rollback" not in out.split("history")[1]
    code, out, _ = run(capsys, "models", "show", b)
    assert "serves       yes" in out and "rollback  c writes nonsense" in out


@pytest.mark.parametrize(
    "args,says",
    [
        (["models", "rollback", "char-rnn:nosuchtag"], "was never promoted"),
        (["models", "show", "nosuchtag"], "char-rnn:nosuchtag was never promoted"),
        (["models", "rollback"], "no model promoted before the current one"),
    ],
)
def test_models_errors_are_one_line(reg, models, capsys, args, says):
    reg.promote(models[0], {})
    code, out, err = run(capsys, *args)
    assert code == 1 and err.count("\n") == 1 and err.startswith("char-rnn: error: ") and says in err


def test_after_a_rollback_the_retrain_starts_from_and_compares_with_the_rolled_back_model(
    prefect_api, tmp_path, monkeypatch, small_text, capsys
):
    monkeypatch.setenv("CHAR_RNN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home" / "bentoml"))
    monkeypatch.setenv("CHAR_RNN_ALLOWED_ROOTS", str(tmp_path))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(small_text[:6000], encoding="utf-8")
    first = pipeline(data_dir=texts, **TINY)
    (texts / "b.txt").write_text(small_text[6000:9000], encoding="utf-8")
    second = pipeline(data_dir=texts, only_if_changed=True, **TINY)
    assert first.promoted and second.promoted and second.tag != first.tag

    assert main(["models", "rollback", "--reason", "the second model is worse"]) == 0
    capsys.readouterr()

    # the text the rolled-back model learnt is not trained on again from the model it replaced ...
    again = pipeline(data_dir=texts, only_if_changed=True, **TINY)
    assert not again.promoted and again.tag == first.tag and again.run_dir is None
    assert again.reason.startswith(f"corpus unchanged since {second.tag}, trained on it, was rolled back to")
    # ... new text is, from the rolled-back model, and compared with it
    (texts / "c.txt").write_text(small_text[9000:12000], encoding="utf-8")
    third = pipeline(data_dir=texts, only_if_changed=True, **TINY)
    assert third.run_dir is not None and third.against.current.model == first.tag
    assert json.loads((third.run_dir / "metrics.json").read_text())["warm_start"] == first.tag
