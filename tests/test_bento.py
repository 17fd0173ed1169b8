"""Bentos: built by hand, as a BentoML user builds one (`bentoml build --arg model=char-rnn:VERSION` from the
repository root, with no uv on PATH), and built by the pipeline after a promotion (`char-rnn pipeline
--bento`), served with `bentoml serve <bento>`, with the Dockerfile `bentoml containerize` would build written
where no Docker daemon is. (`stages.bento.build` on a live server is tested in test_service_http.py.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from test_service import EXTRA, tiny_checkpoint
from test_service_http import promote, running, server_env, without_uv

from serving.bento import requirements

ROOT = Path(__file__).resolve().parent.parent
CHAR_RNN = str(Path(sys.executable).parent / "char-rnn")  # the venv's, on PATH or not
# The checkout's modules that `import service` loads, as paths relative to the checkout.
IMPORTED = f"""
import sys
from pathlib import Path
import service
root = Path({str(ROOT)!r})
for m in list(sys.modules.values()):
    f = Path(getattr(m, "__file__", None) or "/").resolve()
    if f.is_relative_to(root) and ".venv" not in f.parts:
        print(f.relative_to(root))
"""


def test_bentoml_build_by_hand_carries_the_named_model_its_code_and_the_projects_package_ranges(
    small_text, tmp_path
):
    home = tmp_path / "home"
    home.mkdir()
    env = without_uv(server_env(home))
    [tag] = promote(env, tiny_checkpoint(small_text + EXTRA, tmp_path / "ck").path)
    version = tag.split(":")[1]
    build = [sys.executable, "-m", "bentoml", "build", "--arg", f"model={tag}", "--version", version]
    out = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    bento = home / "bentoml" / "bentos" / "char_rnn" / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["args"] == {"model": tag}  # what serving it reads
    [svc] = info["services"]
    assert [m["tag"] for m in svc["models"]] == [tag]

    imported = subprocess.run(
        [sys.executable, "-c", IMPORTED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    needed = set(imported.stdout.split())
    assert {"service.py", "settings/__init__.py", "registry/__init__.py", "serving/bento.py"} <= needed
    assert sorted(p for p in needed if not (bento / "src" / p).is_file()) == []  # the Bento runs on its own
    assert not (bento / "src" / "flows").exists() and not (bento / "src" / "stages").exists()

    locked = {}  # the image's requirements, locked at build time: name -> version
    for line in (bento / "env" / "python" / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("-"):
            name, _, pinned = line.partition("==")
            locked[name.strip().lower()] = pinned.split(";")[0].strip()
    for wanted in map(Requirement, requirements(ROOT / "pyproject.toml")):
        assert wanted.specifier.contains(locked[wanted.name.lower()]), (wanted, locked.get(wanted.name))
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()  # what `bentoml containerize` builds
    assert "requirements.txt" in dockerfile and "FROM python:" in dockerfile


def test_the_pipeline_builds_a_bento_of_what_it_promotes_which_serves_it_and_containerizes(
    small_text, tmp_path
):
    home, corpus = tmp_path / "home", tmp_path / "corpus"
    home.mkdir()
    corpus.mkdir()
    (corpus / "a.txt").write_text(small_text + EXTRA, encoding="utf-8")
    # no Docker anywhere: neither a client on PATH nor a daemon at the address a client would try
    env = without_uv(server_env(home)) | {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    assert shutil.which("docker", path=env["PATH"]) is None or not Path("/var/run/docker.sock").exists()
    tiny = ["--steps", "40", "--hidden", "16", "--layers", "1", "--batch", "4", "--seq", "16"]
    cmd = [CHAR_RNN, "pipeline", "--data", str(corpus), *tiny, "--checkpoint-every", "20", "--bento"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    listed = subprocess.run([CHAR_RNN, "models", "list", "--json"], env=env, capture_output=True, text=True)
    tag = json.loads(listed.stdout)["current"]
    version = tag.split(":")[1]
    assert f"bento: char_rnn:{version}" in out.stdout, out.stdout  # the Bento's version is the model's
    info = yaml.safe_load((home / "bentoml" / "bentos" / "char_rnn" / version / "bento.yaml").read_text())
    assert info["args"] == {"model": tag} and [m["tag"] for m in info["services"][0]["models"]] == [tag]

    # A newer model is promoted: the Bento still serves the one it was built with.
    [newer] = promote(env, tiny_checkpoint(small_text.upper() + EXTRA, tmp_path / "newer", seed=3).path)
    with running(env, tmp_path / "bento.log", f"char_rnn:{version}") as live:
        assert live.client.post("/model_info").json()["model"] == tag != newer
        assert live.client.post("/generate", json={"max_new_chars": 5}).json()["model"] == tag

    # What `bentoml containerize char_rnn:VERSION` builds, written without Docker (stages.bento.dockerfile).
    write = "import sys; from stages.bento import dockerfile; dockerfile(*sys.argv[1:])"
    cmd = [sys.executable, "-c", write, f"char_rnn:{version}", str(tmp_path / "Dockerfile")]
    made = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    text = (tmp_path / "Dockerfile").read_text()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"FROM python:{python}-slim" in text  # the service's image: Debian, the building Python
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in text  # the locked packages
    assert "COPY --chown=bentoml:bentoml . ./" in text and "EXPOSE 3000" in text  # the Bento, model included
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in text
