"""The char-rnn command line: train, sample, evaluate, resume, and one-line errors."""

import shutil
import subprocess

import pytest

from cli import main
from model import checkpoint

FAST = ["--steps", "30", "--hidden", "32", "--batch", "8", "--seq", "16", "--checkpoint-every", "10"]


def test_train_sample_evaluate(tmp_path, small_corpus, capsys):
    out = tmp_path / "ck"
    assert main(["train", "--data", str(small_corpus), "--out", str(out), *FAST]) == 0
    assert "nats/char" in capsys.readouterr().out and checkpoint.load(out).meta.step == 30
    args = ["sample", "--checkpoint", str(out), "--prompt", "ROMEO:", "--length", "50", "--seed", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert len(text) == 51 and not text.startswith("ROMEO:")
    assert main(args) == 0 and capsys.readouterr().out == text  # same seed, same text
    meta_file = str(checkpoint.load(out).path / "meta.json")  # a file inside a checkpoint means its folder
    assert main(["sample", "--checkpoint", meta_file, "--prompt", "", "--length", "5", "--top-k", "3"]) == 0
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(small_corpus)]) == 0
    assert "bits/char" in capsys.readouterr().out


def test_resume_keeps_the_run_settings(tmp_path, small_corpus, capsys):
    out = tmp_path / "ck"
    assert main(["train", "--data", str(small_corpus), "--out", str(out), *FAST[2:], "--steps", "10"]) == 0
    assert main(["train", "--data", str(small_corpus), "--out", str(out), "--resume", "--steps", "20"]) == 0
    ck = checkpoint.load(out)
    assert ck.meta.step == 20 and ck.config.hidden == 32 and ck.meta.train["batch"] == 8


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--checkpoint", "/nonexistent"], "no such checkpoint"),
        (["train", "--data", "/nonexistent", "--out", "x"], "no such file or folder"),
        (["train", "--data", "{corpus}", "--out", "{tmp}/o", "--lr", "-1"], "--lr: Input should be greater"),
        (["train", "--data", "{corpus}", "--out", "{tmp}/o", "--batch", "5000"], "--batch"),
        (["train", "--data", "{corpus}", "--out", "{tmp}/o", "--seq", "4000"], "lower --batch or --seq"),
        (["sample", "--checkpoint", "{tmp}"], "no checkpoints here"),
    ],
)
def test_errors_are_one_line(tmp_path, small_corpus, capsys, args, message):
    args = [a.format(corpus=small_corpus, tmp=tmp_path) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("char-rnn: error:") and message in err


def test_unknown_prompt_chars(tmp_path, small_corpus, capsys):
    out = tmp_path / "ck"
    main(["train", "--data", str(small_corpus), "--out", str(out), *FAST])
    assert main(["sample", "--checkpoint", str(out), "--prompt", "\u4e2d", "--length", "3"]) == 1
    assert "'\u4e2d'" in capsys.readouterr().err
    assert (
        main(["sample", "--checkpoint", str(out), "--prompt", "\u4e2d", "--length", "3", "--unknown", "skip"])
        == 0
    )


def test_console_script_is_installed():
    exe = shutil.which("char-rnn")
    assert exe, "the char-rnn script is not on PATH; install the project (uv sync)"
    r = subprocess.run([exe, "sample", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--temperature" in r.stdout
    r = subprocess.run(
        [exe, "sample", "--checkpoint", "/nonexistent"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_pipeline_parameters_are_checked_before_any_work(capsys):
    assert main(["pipeline", "--data", "/nonexistent", "--steps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("char-rnn: error: data_dir:") and "steps: Input should be greater" in err
