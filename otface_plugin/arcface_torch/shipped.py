"""Where the shipped patches and example configs are, from a wheel or from a source checkout.

In a wheel (and an editable install) the repository's ``patches/`` and ``configs/`` are the
packages ``otface_plugin.patches`` and ``otface_plugin.configs`` (setup.py's package_dir). Run from
a plain source checkout (``PYTHONPATH=.``) those packages do not exist, so fall back to the
folders beside ``otface_plugin/``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import otface_plugin

if TYPE_CHECKING:  # importlib.abc.Traversable moves to importlib.resources.abc in 3.12+
    from importlib.abc import Traversable


def shipped_dir(name: str) -> "Traversable":
    """``name`` is "patches" or "configs"."""
    try:
        return resources.files(f"otface_plugin.{name}")
    except ModuleNotFoundError:
        folder = Path(otface_plugin.__file__).resolve().parent.parent / name
        if not (folder / "__init__.py").is_file():
            raise FileNotFoundError(
                f"otface_plugin.{name} is not installed and {folder} does not exist: "
                "reinstall otface-plugin (pip install otface-plugin)"
            ) from None
        return folder
