"""The char-rnn command line: train, sample, evaluate, resume, and one-line errors."""

import os
import shutil
import stat
import subprocess
import sys

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
    assert ck.meta.step == 20 and ck.config.hidden == 32 and ck.meta.train.batch == 8


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


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--lr", "nan", "--lr: Input should be a finite number"),
        ("--lr", "inf", "--lr: Input should be a finite number"),
        ("--dropout", "nan", "--dropout: Input should be a finite number"),
        ("--clip", "inf", "--clip: Input should be a finite number"),
    ],
)
def test_non_finite_train_flags_say_so(tmp_path, small_corpus, capsys, flag, value, message):
    assert main(["train", "--data", str(small_corpus), "--out", str(tmp_path / "o"), flag, value]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--seed", "-1", "argument --seed: must be in [0, "),
        ("--temperature", "inf", "argument --temperature: must be a finite number"),
        ("--temperature", "1e-310", "argument --temperature: must be in [0.001, 1000]"),
        ("--top-p", "nan", "argument --top-p: must be a finite number"),
        ("--length", "-5", "argument --length: must be in [0, "),
        ("--top-k", "2.5", "argument --top-k: expected a int number"),
    ],
)
def test_sample_flags_are_checked_naming_the_flag(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_train_refuses_a_folder_holding_another_run(tmp_path, small_corpus, capsys):
    out = tmp_path / "ck"
    assert main(["train", "--data", str(small_corpus), "--out", str(out), *FAST]) == 0
    other = ["--steps", "20", "--hidden", "24", *FAST[4:]]
    assert main(["train", "--data", str(small_corpus), "--out", str(out), *other]) == 1
    err = capsys.readouterr().err
    assert "already holds the checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert checkpoint.load(out).config.hidden == 32  # untouched
    assert main(["train", "--data", str(small_corpus), "--out", str(out), *other, "--overwrite"]) == 0
    ck = checkpoint.load(out)
    assert ck.config.hidden == 24 and [p.name for p in checkpoint.step_dirs(out)] == [
        "step-0000020",
        "step-0000010",
    ]


def test_resume_with_another_corpus_says_the_vocabulary_differs(tmp_path, small_corpus, capsys):
    out = tmp_path / "ck"
    assert main(["train", "--data", str(small_corpus), "--out", str(out), *FAST]) == 0
    other = tmp_path / "other.txt"
    other.write_text("zyxw vutsr qponm lkjih\n" * 2000)
    assert main(["train", "--data", str(other), "--out", str(out), "--resume", "--steps", "40"]) == 1
    assert "vocabulary differs" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_get_the_permissions_of_the_umask(tmp_path, small_corpus, umask):
    old = os.umask(umask)
    try:
        assert main(["train", "--data", str(small_corpus), "--out", str(tmp_path / "ck"), *FAST]) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "ck").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_a_full_disk_names_the_file(tmp_path, small_corpus):
    """The kernel refuses writes beyond RLIMIT_FSIZE with EFBIG, as a full disk refuses them with ENOSPC."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["train", "--data", str(small_corpus), "--out", str(tmp_path / "ck"), *FAST]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("char-rnn: error:") and "File too large" in last and str(tmp_path / "ck") in last


@pytest.mark.parametrize("what", ["binary", "empty"])
def test_pipeline_on_bad_input_is_one_line(tmp_path, what):
    folder = tmp_path / "texts"
    folder.mkdir()
    if what == "binary":
        (folder / "a.txt").write_bytes(bytes(range(256)) * 8)
    r = subprocess.run(
        ["char-rnn", "pipeline", "--data", str(folder), "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("char-rnn: error:") and str(folder) in lines[0], r.stderr


def test_every_command_sets_the_homes_before_prefect_or_bentoml_choose_theirs(tmp_path, small_corpus):
    """With only CHAR_RNN_HOME set (no PREFECT_HOME, no BENTOML_HOME) and an empty HOME: the commands that
    import Prefect or BentoML work, and nothing lands under HOME."""
    user = tmp_path / "user-home"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_", "CHAR_RNN_"))}
    env |= {"HOME": str(user), "CHAR_RNN_HOME": str(tmp_path / "home"), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, says in (
        (["models", "list"], "no promoted model under"),
        (["pipeline", "--data", str(empty), "--steps", "5"], "no .txt files in this folder"),
        (
            ["evaluate", "--checkpoint", str(tmp_path / "none"), "--data", str(small_corpus)],
            "no such checkpoint",
        ),
    ):
        r = subprocess.run(["char-rnn", *args], env=env, capture_output=True, text=True, timeout=300)
        assert says in r.stdout + r.stderr and "is not set" not in r.stderr, (args, r.stderr)
    assert sorted(user.rglob("*")) == []
