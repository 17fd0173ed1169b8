"""A Bento of a promoted model: the service's code and pages (listed in `bentofile.yaml`), the model itself,
and the image to run them in (the service's own `image`, `serving/bento.py`). Built after a promotion when
the pipeline is asked to (`build_bento`), or by hand.

`build(tag)` is the same as, from the repository root with the pipeline's BENTOML_HOME exported,

    bentoml build --arg model=char-rnn:VERSION --version VERSION

The `model` argument is BentoML's template argument (`bentoml.use_arguments`, read by `service.py`): the
service declares that model, so BentoML copies it into the Bento, and the Bento serves it (no hot reload).
BentoML keeps the argument in the Bento, so `bentoml serve char_rnn:VERSION` and `bentoml containerize` need
nothing more. `dockerfile(bento)` writes the Dockerfile `bentoml containerize` would build, without Docker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import settings

SERVICE = "char_rnn"  # the Bento's name: the service's


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


def version_of(tag: str) -> str:
    """The version of promoted model `tag` ("char-rnn:VERSION"), which its Bento takes as its own."""
    import bentoml  # BentoML picks its home when imported: only once the entry point has set it

    version = bentoml.Tag.from_taglike(tag).version
    if not version or version == "latest":
        raise ValueError(f"{tag!r}: name the promoted model by its version, e.g. char-rnn:<version>")
    return version


def build(tag: str, *, build_ctx: Path = settings.ROOT) -> str:
    """Build a Bento of promoted model `tag` ("char-rnn:VERSION") into the BentoML home; its tag,
    "char_rnn:VERSION", the model's version. The model must be in the model store (the registry put it
    there). BentoML looks for uv itself: the project's own (a dependency) serves when none is on PATH."""
    import bentoml

    version = version_of(tag)
    with uv_cache(settings.current().home / "uv-cache"):
        bento = bentoml.bentos.build_bentofile(
            str(build_ctx / "bentofile.yaml"), version=version, build_ctx=str(build_ctx), args={"model": tag}
        )
    return str(bento.tag)


def dockerfile(bento: str, out: Path) -> Path:
    """Write the Dockerfile `bentoml containerize <bento>` builds (BentoML's `get_containerfile`; no Docker
    needed) to `out`; its path."""
    import bentoml

    bentoml.container.get_containerfile(bento, output_path=str(out))
    return out
