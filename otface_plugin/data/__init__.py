"""Data tools: MXNet RecordIO without mxnet, identity index, P x K samplers, .rec/.bin builders.

``MXRecordIO``, ``MXIndexedRecordIO``, ``IRHeader``, ``pack``, ``unpack``, ``pack_img`` and
``unpack_img`` are drop-in replacements for ``mx.recordio``'s. ``PKSampler`` and ``HardPKSampler`` need torch and are
imported on first use, so the RecordIO part works in an environment without torch (such as the
mxnet cross-compatibility environment).
"""
from __future__ import annotations

from typing import Any

from otface_plugin.data.errors import DatasetLayoutError, ImageDecodeError, RecordIOError
from otface_plugin.data.identity_index import IdentityIndex
from otface_plugin.data.recordio import (
    IRHeader,
    MXIndexedRecordIO,
    MXRecordIO,
    pack,
    pack_img,
    unpack,
    unpack_img,
)

__all__ = [
    "DatasetLayoutError",
    "HardPKSampler",
    "IRHeader",
    "IdentityIndex",
    "ImageDecodeError",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "PKBatchSampler",
    "PKSampler",
    "RecordIOError",
    "pack",
    "pack_img",
    "unpack",
    "unpack_img",
]

_LAZY = {"PKSampler": "otface_plugin.data.sampler", "PKBatchSampler": "otface_plugin.data.sampler",
         "HardPKSampler": "otface_plugin.data.sampler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # torch is only needed for the samplers
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
