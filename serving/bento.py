"""The image a Bento of the service runs in: `image()`, which `service.py` gives BentoML as the service's
`image`. (A Bento itself is built by `stages/bento.py`, after a promotion or by hand.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import bentoml

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
