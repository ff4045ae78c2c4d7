"""What a patched arcface_torch ``train_v2.py`` calls (see patches/20-otface-hooks.patch).

    cfg = prepare_config(cfg)                            # checks loss / sampler / otface keys
    get_dataloader(..., sampler=build_sampler(cfg))      # None keeps upstream's sampler
    module_partial_fc = build_head(cfg, module_partial_fc, backbone)   # PFC itself unless otface
    log_components(module_partial_fc, global_step, cfg.frequent, summary_writer)  # = after_step

and, from patches/30-otface-checkpoints.patch and 40-otface-precision.patch (checkpoint.py):

    comm_hook(cfg, fp16_compress_hook); set_precision(cfg, backbone, module_partial_fc)  # precision: bf16
    init_from(cfg, rank, world_size, backbone, module_partial_fc)      # init_backbone, ...
    if resume_elsewhere(cfg, world_size): resume(...)    # a set saved on other ranks
    restore_grad_scaler(cfg, rank, amp); checkpoint_extras(checkpoint, cfg, world_size, amp)

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
    "set_precision": "otface_plugin.arcface_torch.hooks",
    "comm_hook": "otface_plugin.arcface_torch.hooks",
    "restore_grad_scaler": "otface_plugin.arcface_torch.hooks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
