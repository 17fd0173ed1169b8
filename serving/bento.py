"""A Bento of a promoted model: the service's code and pages (listed in `bentofile.yaml`), the model itself,
and the image to run them in (`image()`, which `service.py` gives BentoML as the service's `image`).

`build(tag)` is what a promotion calls; by hand, from the repository root with the pipeline's BENTOML_HOME
exported, the same Bento is

    bentoml build --arg model=char-rnn:VERSION --version VERSION

The `model` argument is BentoML's template argument (`bentoml.use_arguments`, read by `service.py`): the
service declares that model, so BentoML copies it into the Bento, and the Bento serves it (no hot reload).
BentoML keeps the argument in the Bento, so `bentoml serve char_rnn:VERSION` and `bentoml containerize` need
nothing more.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bentoml

import settings

ROOT = Path(__file__).resolve().parent.parent
# What the service imports (besides BentoML, which BentoML pins to its own version in every image); their
# version ranges are read from pyproject.toml, so that the image asks for what the project is tested with.
PACKAGES = ("numpy", "pydantic", "pydantic-settings", "threadpoolctl", "uvloop", "httptools")


def name_of(requirement: str) -> str:
    """The normalised project name of a requirement such as "numpy>=2.1,<3" (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def requirements(pyproject: Path, names: tuple[str, ...] = PACKAGES) -> list[str]:
    """`names` with their version ranges as `pyproject.toml`'s [project].dependencies state them."""
    listed = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    by_name = {name_of(r): r.strip() for r in listed}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"{pyproject}: [project].dependencies lacks {', '.join(missing)}, which the service needs"
        )
    return [by_name[n] for n in names]


def image(pyproject: Path = ROOT / "pyproject.toml") -> bentoml.images.Image | None:
    """The image a Bento of the service runs in: BentoML's Debian Python image (the building interpreter's
    version) with the service's packages, locked at build time (BentoML's default). None where there is no
    pyproject.toml: inside a built Bento, whose image was frozen into its bento.yaml when it was built."""
    if not pyproject.is_file():
        return None
    return bentoml.images.Image(distro="debian").python_packages(*requirements(pyproject))


@contextmanager
def uv_cache(folder: Path) -> Iterator[None]:
    """UV_CACHE_DIR set to `folder` meanwhile, unless the user set their own: BentoML locks the image's
    packages with uv, whose cache is otherwise under ~, and nothing of the project is written there."""
    if "UV_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["UV_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        del os.environ["UV_CACHE_DIR"]


def build(tag: str, *, build_ctx: Path = ROOT) -> str:
    """Build a Bento of promoted model `tag` ("char-rnn:VERSION") into the BentoML home; its tag, whose
    version is the model's. The model must be in the model store (the registry put it there). BentoML looks
    for uv itself: the project's own (a dependency) serves when none is on PATH."""
    version = bentoml.Tag.from_taglike(tag).version
    if not version or version == "latest":
        raise ValueError(f"{tag!r}: name the promoted model by its version, e.g. char-rnn:<version>")
    with uv_cache(settings.current().home / "uv-cache"):
        bento = bentoml.bentos.build_bentofile(
            str(build_ctx / "bentofile.yaml"), version=version, build_ctx=str(build_ctx), args={"model": tag}
        )
    return str(bento.tag)
