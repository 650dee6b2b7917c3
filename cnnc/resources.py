"""Where the grammar, templates and device runtime live.

In a checkout they sit at the top of the repository (the product's layout);
in an installed wheel they ship as ``cnnc/_data/<name>``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def resource_dir(name: str) -> Path:
    """The folder `grammar`, `templates` or `runtime`, wherever it was installed."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cnnc installation is incomplete: no '{name}' folder next to {_PACKAGE}")
