"""The keys a recipe job config may set, their types and defaults: what the config check reads.

Defaults and choices are read from the code that owns them, never restated here: the OTFace
options from where ``OTFaceLoss``, ``OTFaceTerm`` and the probe declare them (``otface_options``),
the sampler names, K and the hard-sampler options from
``data/sampler.py``. This module only declares; ``config.py`` loads and checks.

Keys the plugin adds (python and YAML configs alike):

- ``loss``: unset (upstream), ``"arcface"``, ``"cosface"``, ``"combined"`` (upstream
  CombinedMarginLoss with ``margin_list``), a registered margin head (``"adaface"``,
  ``"curricularface"``, ``"elasticface_arc"``, ``"elasticface_cos"``: PartialFC_V2 with that
  margin function) or ``"otface"``;
- ``head_options``: a mapping of the margin head's options (e.g. ``{m: 0.4, h: 0.333}``), for
  ``loss: <head>`` or ``otface: {margin: <head>}``;
- ``sampler``: ``"pk"`` (P identities x K images per batch; the default for otface), ``"hard"``
  (P x K batches holding groups of neighbouring identities, by the margin head's class centres) or
  ``"distributed"`` (upstream's; the default otherwise);
- ``hard``: options of ``sampler: hard``: ``neighbours`` and ``hard_fraction`` (HardPKSampler's
  defaults, 3 and 0.5), ``refresh_steps`` (how often the class centres are re-read, 1000);
- ``num_instances``: K, images per identity in a P x K batch (``DEFAULT_NUM_INSTANCES``, 4);
- ``otface``: a mapping of OTFaceLoss options (``lambda_ot``, ``eps``, ``iters``, ``feature``,
  ``triplet_mode``, ...), plus ``margin`` (``arcface``/``cosface``/[m1, m2, m3] or a head name) and ``layer``
  (the backbone submodule whose output the OT term reads; by default chosen per backbone, see
  feature_layers.py).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Tuple

from otface_plugin.data.sampler import DEFAULT_NUM_INSTANCES, HARD_OPTION_RULES, SAMPLER_CLASSES, HardPKSampler

__all__ = ["ConfigError", "DEFAULT_NUM_INSTANCES", "DEFAULT_REFRESH_STEPS", "FROM_RECIPE", "HARD_OPTIONS",
           "HOOK_OPTIONS", "KNOWN_KEYS", "PLUGIN_KEYS", "RECIPE_KEYS", "RECIPE_LOSSES", "RECIPE_UNSUPPORTED",
           "PK_SAMPLERS", "SAMPLERS", "otface_loss_options"]

Number = (int, float)


class ConfigError(ValueError):
    """A config key is unknown or has a value of the wrong type."""


# key -> (accepted python types, description). None in a tuple means the key may be null.
RECIPE_KEYS: Dict[str, Tuple[tuple, str]] = {
    # configs/base.py
    "margin_list": ((list, tuple), "a list of three numbers [m1, m2, m3]"),
    "network": ((str,), "a backbone name such as r50"),
    "resume": ((bool,), "true or false"),
    "save_all_states": ((bool,), "true or false"),
    "output": ((str, type(None)), "a directory or null"),
    "embedding_size": ((int,), "an integer"),
    "sample_rate": (Number, "a number"),
    "interclass_filtering_threshold": (Number, "a number"),
    "fp16": ((bool,), "true or false"),
    "batch_size": ((int,), "an integer"),
    "optimizer": ((str,), '"sgd" or "adamw"'),
    "lr": (Number, "a number"),
    "momentum": (Number, "a number"),
    "weight_decay": (Number, "a number"),
    "verbose": ((int,), "an integer"),
    "frequent": ((int,), "an integer"),
    "dali": ((bool,), "true or false"),
    "dali_aug": ((bool,), "true or false"),
    "gradient_acc": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
    "num_workers": ((int,), "an integer"),
    "wandb_key": ((str,), "a string"),
    "suffix_run_name": ((str, type(None)), "a string or null"),
    "using_wandb": ((bool,), "true or false"),
    "wandb_entity": ((str,), "a string"),
    "wandb_project": ((str,), "a string"),
    "wandb_log_all": ((bool,), "true or false"),
    "save_artifacts": ((bool,), "true or false"),
    "wandb_resume": ((bool,), "true or false"),
    "notes": ((str, type(None)), "a string or null"),
    # the dataset part every job config sets
    "rec": ((str,), "a directory with train.rec/train.idx, or 'synthetic'"),
    "num_classes": ((int,), "an integer"),
    "num_image": ((int,), "an integer"),
    "num_epoch": ((int,), "an integer"),
    "warmup_epoch": ((int,), "an integer"),
    "val_targets": ((list, tuple), "a list of .bin names"),
}

# the recipe's samplers: the plugin's P x K ones (data/sampler.py) and upstream's DistributedSampler
PK_SAMPLERS = tuple(SAMPLER_CLASSES)
SAMPLERS = (*PK_SAMPLERS, "distributed")

PLUGIN_KEYS: Dict[str, Tuple[tuple, str]] = {
    "loss": ((str, type(None)), "a loss name (arcface, cosface, combined, otface)"),
    "sampler": ((str, type(None)), ", ".join(f'"{s}"' for s in SAMPLERS[:-1]) + f' or "{SAMPLERS[-1]}"'),
    "num_instances": ((int,), "an integer"),
    "otface": ((dict,), "a mapping of OTFace options"),
    "head_options": ((dict,), "a mapping of the margin head's options"),
    "hard": ((dict,), "a mapping of hard-sampler options (neighbours, hard_fraction, refresh_steps)"),
}
# fine-tuning (hooks.init_from, checkpoint.py): files the job starts from, unless it resumes
INIT_KEYS: Dict[str, Tuple[tuple, str]] = {
    "init_backbone": ((str, type(None)), "a backbone state dict file (the recipe's model.pt) or null"),
    "init_class_centres": ((str, type(None)), "a merged checkpoint (otface-ckpt merge) or null"),
}
PLUGIN_KEYS.update(INIT_KEYS)
# precision: the recipe's mixed precision (hooks.set_precision); fp16 is upstream's `fp16: true`
PRECISIONS = ("fp32", "fp16", "bf16")
PLUGIN_KEYS["precision"] = ((str, type(None)), " or ".join(f'"{p}"' for p in PRECISIONS))
KNOWN_KEYS = {**RECIPE_KEYS, **PLUGIN_KEYS}

DEFAULT_REFRESH_STEPS = 1000  # hard.refresh_steps: the recipe's refresh of the class centres (hooks.py)
# sampler: hard options -> (default, accepted types, description, valid). neighbours and
# hard_fraction are HardPKSampler's own: its signature's defaults, its range rules.
_HARD_DEFAULTS = inspect.signature(HardPKSampler).parameters
HARD_OPTIONS: Dict[str, Tuple[Any, tuple, str, Any]] = {
    **{name: (_HARD_DEFAULTS[name].default, types, what, ok) for name, (types, what, ok) in HARD_OPTION_RULES.items()},
    "refresh_steps": (DEFAULT_REFRESH_STEPS, (int,), "an integer >= 1", lambda v: v >= 1),
}

RECIPE_LOSSES = ("arcface", "cosface", "combined", "otface")
# OTFaceLoss arguments that train_v2.py supplies itself
FROM_RECIPE = ("head", "num_classes", "embedding_size")
# options of the otface block that are the hook's, not the loss's
HOOK_OPTIONS = {"layer": ((str,), "a backbone submodule name such as layer4")}
# OTFace options train_v2.py cannot serve -> why (rejected when the config is loaded, not at step 1)
RECIPE_UNSUPPORTED = {
    ("triplet_mode", "misclassified"): "it needs the margin head's logits, which the recipe's PartialFC_V2 "
                                       "does not expose; use hard or all",
}


def otface_loss_options() -> Dict[str, inspect.Parameter]:
    """The OTFace options a config may set (the recipe supplies the rest): the flat form's, as
    OTFaceLoss, OTFaceTerm and the gradient-share probe declare them."""
    from otface_plugin.losses.otface import otface_options

    return {n: p for n, p in otface_options().items() if n not in FROM_RECIPE}


def option_type(default: Any):
    """(types, description) of an OTFace option, from its default; None when not checkable."""
    if default is None:  # optional number: None or a number
        return (int, float, type(None)), "a number or null"
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return Number, "a number"
    if isinstance(default, str):
        return (str,), "a string"
    return None
