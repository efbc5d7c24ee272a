"""The files mlx-pager ships: the embedded model, the catalogue, the calibration prompts.

The repository's ``assets/`` folder is installed as the package ``mlx_pager.assets``
(``pyproject.toml``), so one helper finds these files in a source checkout, an editable
install and a wheel alike.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def asset_path(*parts: str) -> Path:
    """The shipped file or folder ``parts`` (e.g. ``asset_path("catalogue.json")``)."""
    return Path(str(files(__name__).joinpath(*parts)))


EMBEDDED_MODEL = "tiny-moe"  # the default model: small, offline, shipped in the package


def embedded_model() -> Path:
    """The folder of the embedded default model."""
    return asset_path(EMBEDDED_MODEL)
