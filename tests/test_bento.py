"""A Bento built by hand, as a BentoML user builds one: `bentoml build --arg model=char-rnn:VERSION` from the
repository root, with no uv on PATH. (`serving.bento.build`, the same from Python, and serving the result are
tested in test_service_http.py.)"""

import subprocess
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from test_service import EXTRA, tiny_checkpoint
from test_service_http import promote, server_env, without_uv

from serving.bento import requirements

ROOT = Path(__file__).resolve().parent.parent
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
