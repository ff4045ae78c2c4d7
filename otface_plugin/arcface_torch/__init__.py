"""What a patched arcface_torch ``train_v2.py`` calls (see patches/20-otface-hooks.patch).

    cfg = prepare_config(cfg)                            # checks loss / sampler / otface keys
    get_dataloader(..., sampler=build_sampler(cfg))      # None keeps upstream's sampler
    module_partial_fc = build_head(cfg, module_partial_fc, backbone)   # PFC itself unless otface
    log_components(module_partial_fc, global_step, cfg.frequent, summary_writer)  # = after_step

``schema`` declares the keys, ``config`` loads and checks them, ``hooks`` holds these call sites.
Also here: the patch installer (``installer``, the ``otface-install`` command), the upstream pin
(``pins``) and the no-patch wrapper (``train_wrapper``, the ``otface-train`` command). Imports
are lazy so that the installer works without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "prepare_config": "otface_plugin.arcface_torch.config",
    "load_yaml_config": "otface_plugin.arcface_torch.config",
    "build_head": "otface_plugin.arcface_torch.hooks",
    "build_sampler": "otface_plugin.arcface_torch.hooks",
    "log_components": "otface_plugin.arcface_torch.hooks",
    "after_step": "otface_plugin.arcface_torch.hooks",
    "OTFaceHead": "otface_plugin.arcface_torch.hooks",
    "resume_elsewhere": "otface_plugin.arcface_torch.hooks",
    "resume": "otface_plugin.arcface_torch.hooks",
    "checkpoint_extras": "otface_plugin.arcface_torch.hooks",
    "init_from": "otface_plugin.arcface_torch.hooks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
