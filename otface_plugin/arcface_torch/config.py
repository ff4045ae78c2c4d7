"""Job configs for arcface_torch: YAML loading and the one check of the plugin's keys.

A YAML job (``train_v2.py configs/NAME.yaml``) is merged over ``configs/base.py`` exactly as a
python job is (``cfg = base.config; cfg.update(job)``; ``output`` defaults to
``work_dirs/NAME``). Unlike python configs it is checked first: an unknown key or a value of the
wrong type is an error that names the key, so a typo cannot silently train with a default.
:func:`prepare_config` (what train_v2.py calls after ``get_config``) checks python and YAML jobs
alike and resolves the margin and the sampler.

The keys, their types and defaults are declared in ``schema.py`` (read from the owners'
signatures); their values are checked here, each once: an ``otface`` block's values by building
the loss once (its own range checks apply), and a block already checked (a YAML job, checked on
load, then ``prepare_config``) is not built again.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import os.path as osp
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple

from otface_plugin.arcface_torch.schema import (  # noqa: F401  (re-exported: config.X still works)
    DEFAULT_NUM_INSTANCES,
    FROM_RECIPE,
    HARD_OPTIONS,
    HOOK_OPTIONS,
    KNOWN_KEYS,
    PK_SAMPLERS,
    PLUGIN_KEYS,
    RECIPE_KEYS,
    RECIPE_LOSSES,
    RECIPE_UNSUPPORTED,
    SAMPLERS,
    ConfigError,
    Number,
    option_type,
    otface_loss_options,
)
from otface_plugin.losses.margin import MARGIN_PRESETS, margin_triple

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# YAML
def load_yaml_config(config_file: str, base_cfg: Any) -> Any:
    """``get_config`` for ``configs/NAME.yaml``: check the job, merge it over ``base_cfg``."""
    import yaml

    _config_errors_in_one_line()  # train_v2.py's get_config loads the YAML before prepare_config
    path = _find(config_file)
    with open(path, encoding="utf-8") as f:
        try:
            job = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file}: not valid YAML: {exc}") from None
    if job is None:
        job = {}
    if not isinstance(job, dict):
        raise ConfigError(f"{config_file}: a job config must be a mapping of keys, got {type(job).__name__}")
    job = check_job(job, where=config_file)
    cfg = base_cfg
    cfg.update(job)
    if cfg.get("output") is None:
        cfg.output = osp.join("work_dirs", osp.splitext(osp.basename(config_file))[0])
    return cfg


def _find(config_file: str) -> str:
    """The YAML file: relative to the working directory, else to the recipe's directory, else
    one of the plugin's example configs (the no-patch wrapper does not copy them)."""
    if osp.isfile(config_file):
        return config_file
    looked = [osp.abspath(config_file)]
    try:
        import configs  # the recipe's own configs package (found through train_v2.py's folder)

        candidate = osp.join(osp.dirname(osp.dirname(osp.abspath(configs.__file__))), config_file)
        looked.append(candidate)
        if osp.isfile(candidate):
            return candidate
    except ImportError:
        pass
    try:
        from otface_plugin.arcface_torch.shipped import shipped_dir

        candidate = osp.join(os.fspath(shipped_dir("configs")), osp.basename(config_file))
        looked.append(candidate)
        if osp.isfile(candidate):
            return candidate
    except (FileNotFoundError, TypeError):
        pass
    raise FileNotFoundError(f"{config_file}: no such config file (looked at {', '.join(looked)})")


def check_job(job: Mapping[str, Any], where: str = "config") -> Dict[str, Any]:
    """Check a YAML job's keys and value types; returns it with lists turned into tuples where
    the recipe expects tuples (margin_list)."""
    out: Dict[str, Any] = {}
    for key, value in job.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config keys must be strings, got {key!r}")
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, KNOWN_KEYS)}")
        _check_type(where, key, value, *KNOWN_KEYS[key])
        out[key] = value
    if "margin_list" in out:
        out["margin_list"] = _margin_triple(out["margin_list"], f"{where}: key 'margin_list'")
    if "val_targets" in out and not all(isinstance(v, str) for v in out["val_targets"]):
        raise ConfigError(f"{where}: key 'val_targets' must be a list of names, got {out['val_targets']!r}")
    if "otface" in out:
        check_otface_options(out["otface"], where)
    if "hard" in out:
        hard_options(out["hard"], where)
    return out


def _check_type(where: str, key: str, value: Any, types: tuple, what: str) -> None:
    # bool is an int in python; a YAML `true` is never a valid number or count here
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise ConfigError(f"{where}: key {key!r} must be {what}, got {type(value).__name__} {value!r}")


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else f"; known keys: {', '.join(sorted(known))}"


def _margin_triple(value: Any, what: str) -> Tuple[float, float, float]:
    """:func:`~otface_plugin.losses.margin.margin_triple`, its error as a ConfigError."""
    try:
        return margin_triple(value, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# the otface block (its options: schema.otface_loss_options, from OTFaceLoss's signature)
def check_otface_options(options: Mapping[str, Any], where: str = "config") -> None:
    """Unknown options and wrong types are errors naming ``otface.<key>``; values are checked by
    building the loss once (its own range checks, e.g. eps > 0, then apply)."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: key 'otface' must be a mapping of OTFace options, got {options!r}")
    accepted = otface_loss_options()
    for key, value in options.items():
        name = f"otface.{key}"
        if key in HOOK_OPTIONS:
            _check_type(where, name, value, *HOOK_OPTIONS[key])
            continue
        if key not in accepted:
            raise ConfigError(f"{where}: unknown key {name!r}{_suggest(key, list(accepted) + list(HOOK_OPTIONS))}")
        if isinstance(value, str) and (key, value) in RECIPE_UNSUPPORTED:
            raise ConfigError(f"{where}: key {name!r}: {value!r} does not work in train_v2.py: "
                              f"{RECIPE_UNSUPPORTED[key, value]}")
        if key == "margin":
            if not (isinstance(value, str) and value in _heads()):
                _margin_triple(value, f"{where}: key {name!r}")
            continue
        if key == "s" and value != 64:
            raise ConfigError(f"{where}: key {name!r}: train_v2.py's margin softmax uses s=64; other scales are not supported")
        if key == "lambda_ot" and isinstance(value, str):  # a number, or the adaptive lambda
            if value != "auto":
                raise ConfigError(f"{where}: key {name!r} must be a number >= 0 or \"auto\", got {value!r}")
            continue
        if key == "lambda_range":
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ConfigError(f"{where}: key {name!r} must be a pair [low, high], got {value!r}")
            for v in value:
                _check_type(where, name, v, Number, "a pair of numbers [low, high]")
            continue
        rule = option_type(accepted[key].default)
        if rule is not None:
            _check_type(where, name, value, *rule)
    _check_otface_values(options, where)


_CHECKED_OTFACE: "OrderedDict[str, None]" = OrderedDict()  # otface blocks whose values passed, by content


def _check_otface_values(options: Mapping[str, Any], where: str) -> None:
    """The values' ranges, by building the loss around a stand-in head (OTFaceLoss and OTFaceTerm
    check their own arguments); once per distinct block, so a YAML job checked on load is not
    built again by prepare_config."""
    key = repr(sorted((k, repr(v)) for k, v in options.items()))
    if key in _CHECKED_OTFACE:
        return
    try:
        build_otface_loss(lambda e, l: e.sum(), options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: key 'otface': {exc}") from None
    _CHECKED_OTFACE[key] = None
    while len(_CHECKED_OTFACE) > 64:
        _CHECKED_OTFACE.popitem(last=False)


def _heads() -> Mapping[str, Any]:
    """The heads train_v2.py installs into PartialFC_V2 (not the combined margin: it keeps its own)."""
    from otface_plugin.losses.head import plugin_heads

    return plugin_heads()


def head_of(cfg: Any) -> Optional[str]:
    """The registered margin head a config trains with (``loss: <head>`` or ``otface.margin``),
    or None for the recipe's own combined margin."""
    loss = cfg.get("loss")
    if loss in _heads():
        return loss
    margin = (cfg.get("otface") or {}).get("margin") if loss == "otface" else None
    return margin if isinstance(margin, str) and margin in _heads() else None


def check_head_options(cfg: Any) -> None:
    """``head_options`` only with a head, and values the head accepts (checked by building it);
    no ``interclass_filtering_threshold`` with a head (only the combined margin applies it)."""
    head = head_of(cfg)
    if head is not None and cfg.get("interclass_filtering_threshold", 0):
        raise ConfigError(f"key 'interclass_filtering_threshold' belongs to the recipe's combined margin; "
                          f"margin head {head!r} does not use it (set it to 0)")
    options = cfg.get("head_options")
    if options is None:
        return
    if head is None:
        raise ConfigError(f"config sets 'head_options' but trains with no margin head ({', '.join(sorted(_heads()))})")
    if not isinstance(options, Mapping):
        raise ConfigError(f"key 'head_options' must be a mapping of {head} options, got {options!r}")
    from otface_plugin.losses.head import build_margin

    try:
        build_margin(head, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"key 'head_options': {exc}") from None


def build_otface_loss(head, options: Mapping[str, Any]):
    """OTFaceLoss around the margin ``head`` (PartialFC_V2) with the config's options (hook options left out)."""
    from otface_plugin import build_loss

    loss_options = {k: v for k, v in options.items() if k not in HOOK_OPTIONS and k != "margin"}
    return build_loss("otface", head=head, **loss_options)


def hard_options(options: Any, where: str = "config") -> Dict[str, Any]:
    """The ``hard`` block with its defaults filled in; unknown keys and bad values name ``hard.<key>``."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: key 'hard' must be a mapping of hard-sampler options, got {options!r}")
    out = {}
    for key, (default, types, what, valid) in HARD_OPTIONS.items():
        value = options.get(key, default)
        _check_type(where, f"hard.{key}", value, types, what)
        if not valid(value):
            raise ConfigError(f"{where}: key 'hard.{key}' must be {what}, got {value!r}")
        out[key] = value
    unknown = [k for k in options if k not in HARD_OPTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown key 'hard.{unknown[0]}'{_suggest(unknown[0], HARD_OPTIONS)}")
    return out


# ----------------------------------------------------------------------------------------------
# what train_v2.py calls right after get_config
def prepare_config(cfg: Any) -> Any:
    """Check the plugin's keys and resolve them, for python and YAML configs alike.

    Leaves a config without ``loss``/``sampler``/``otface`` untouched (but type-checked, see
    :func:`check_value_types`). ``loss`` must be a registered loss (else the registry's error);
    ``arcface``/``cosface`` (and ``otface`` through ``otface.margin``) set ``margin_list`` to that
    margin unless it already is of that kind.
    """
    _config_errors_in_one_line()
    check_value_types(cfg)
    check_init_files(cfg)
    resolve_precision(cfg)
    loss = cfg.get("loss")
    if loss is None:
        if cfg.get("otface") is not None:
            raise ConfigError("config sets 'otface' options but not loss: 'otface'")
        check_head_options(cfg)
        if cfg.get("sampler") is not None or cfg.get("hard") is not None:
            _resolve_sampler(cfg, None)
        return cfg
    name = _check_loss_name(loss)
    cfg.loss = name
    if name == "otface":
        options = cfg.get("otface") or {}
        check_otface_options(options)
        cfg.otface = options
        if _reads_conv_features(options):
            from otface_plugin.arcface_torch.feature_layers import check_layer

            check_layer(cfg)
        _set_margin(cfg, options.get("margin", "arcface"))
        _note_fp16_without_cuda(cfg)
        if cfg.get("using_wandb") and "notes" not in cfg:
            # train_v2.py passes cfg.notes to wandb.init, but configs/base.py does not define it: without
            # this, using_wandb prints "WandB Data ... must be provided" and trains without wandb
            cfg.notes = None
    elif name in _heads():
        if cfg.get("otface") is not None:
            raise ConfigError(f"config sets 'otface' options but loss is {name!r}")
    else:
        if cfg.get("otface") is not None:
            raise ConfigError(f"config sets 'otface' options but loss is {name!r}")
        if name in MARGIN_PRESETS:
            _set_margin(cfg, name)
    check_head_options(cfg)
    _resolve_sampler(cfg, name)
    return cfg


def _config_errors_in_one_line() -> None:
    """In the recipe's process (train_v2.py calls prepare_config first), a ConfigError that ends
    it, here or later in the plugin's call sites (the sampler's label range, ``otface.layer`` at
    model build, a checkpoint that does not fit at resume), is printed as one line naming the key,
    as otface-train prints it, instead of a traceback on every rank; other exceptions keep
    theirs. The exit status stays 1."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "_otface_one_line", False):
        return

    def hook(kind, value, tb):
        if isinstance(value, ConfigError):
            print(f"otface-plugin: bad config: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook._otface_one_line = True
    sys.excepthook = hook


def _reads_conv_features(options: Mapping[str, Any]) -> bool:
    """Whether the OT term reads a backbone layer (``feature`` conv, OTFaceTerm's default)."""
    import inspect

    from otface_plugin.losses import OTFaceTerm

    return options.get("feature", inspect.signature(OTFaceTerm).parameters["feature"].default) == "conv"


def check_value_types(cfg: Mapping[str, Any], where: str = "config") -> None:
    """The known keys' value types, for python configs too (YAML jobs are checked on load): a
    ``batch_size = "16"`` is an error naming the key, not a TypeError deep in train_v2.py. Keys
    this module does not know are left alone: python configs may carry their own."""
    for key, (types, what) in KNOWN_KEYS.items():
        if key in cfg and not (key in PLUGIN_KEYS and cfg[key] is None):
            _check_type(where, key, cfg[key], types, what)


def check_init_files(cfg: Mapping[str, Any]) -> None:
    """The fine-tuning keys (``schema.INIT_KEYS``) name files that exist, checked before training
    starts; what is in them is checked when they are loaded (checkpoint.py)."""
    from otface_plugin.arcface_torch.schema import INIT_KEYS

    for key in INIT_KEYS:
        path = cfg.get(key)
        if path is not None and not osp.isfile(path):
            raise ConfigError(f"key {key!r}: no such file {path} (looked from {os.getcwd()})")


def resolve_precision(cfg: Any) -> None:
    """``precision`` (``schema.PRECISIONS``) against upstream's ``fp16``: ``fp16`` is
    ``precision: fp16`` (which sets ``fp16: true``); ``fp16: true`` beside another precision is an
    error. Unset, the config is left as it is."""
    from otface_plugin.arcface_torch.schema import PRECISIONS

    precision = cfg.get("precision")
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise ConfigError(f"key 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16":
        cfg.fp16 = True
    elif cfg.get("fp16"):
        raise ConfigError(f"key 'precision' is {precision!r} but 'fp16' is true (fp16: true means precision: fp16); "
                          "set one of them")


def _note_fp16_without_cuda(cfg: Any) -> None:
    """``fp16: true`` without CUDA: the recipe's ``torch.cuda.amp`` autocast and GradScaler switch
    themselves off and the job trains in float32; say so plainly instead of torch's warnings."""
    if not cfg.get("fp16"):
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        log.warning("otface-plugin: fp16: true, but CUDA is not available: the recipe's CUDA autocast and "
                    "GradScaler are off, so this job trains in float32 on the CPU")


def _check_loss_name(loss: Any) -> str:
    from otface_plugin.registry import registered_name

    if not isinstance(loss, str) or not loss.strip():
        raise ConfigError(f"key 'loss' must be a loss name, got {loss!r}")
    name = registered_name(loss)  # the registry's own error for a name nothing registered
    if name not in RECIPE_LOSSES and name not in _heads():
        raise ConfigError(
            f"loss {loss!r} is registered, but train_v2.py can build only "
            f"{', '.join(RECIPE_LOSSES + tuple(sorted(_heads())))}"
        )
    return name


def _set_margin(cfg: Any, margin: Any) -> None:
    """Point margin_list at the requested margin family, keeping the config's own margins when
    they already are of that family (e.g. CosFace with m3=0.35)."""
    if not isinstance(margin, str):
        cfg.margin_list = _margin_triple(margin, "otface.margin")
        return
    if margin in _heads():  # the head replaces the recipe's margin function; margin_list unused
        return
    current = tuple(cfg.get("margin_list", ()))
    if len(current) == 3 and _family(current) == margin:
        return
    target = MARGIN_PRESETS[margin]
    if current != target:
        log.info("otface-plugin: loss %s sets margin_list %s (was %s)", margin, target, current)
    cfg.margin_list = target


def _family(m: Tuple[float, float, float]) -> Optional[str]:
    m1, m2, m3 = m
    if m1 == 1.0 and m3 == 0.0 and m2 > 0:
        return "arcface"
    if m1 == 1.0 and m2 == 0.0 and m3 > 0:
        return "cosface"
    return None


def _resolve_sampler(cfg: Any, loss: Optional[str]) -> None:
    sampler = cfg.get("sampler")
    if sampler is None:
        sampler = "pk" if loss == "otface" else "distributed"
    if sampler not in SAMPLERS:
        raise ConfigError(f"key 'sampler' must be one of {SAMPLERS}, got {sampler!r}")
    cfg.sampler = sampler
    if cfg.get("hard") is not None and sampler != "hard":
        raise ConfigError(f"config sets 'hard' options but sampler is {sampler!r} (use sampler: hard)")
    if sampler == "hard":
        cfg.hard = hard_options(cfg.get("hard") or {})
    if sampler in PK_SAMPLERS:
        k = cfg.get("num_instances", DEFAULT_NUM_INSTANCES)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ConfigError(f"key 'num_instances' must be an integer >= 2 (images per identity), got {k!r}")
        if cfg.batch_size % k:
            raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of num_instances {k}")
        if cfg.batch_size == k:
            raise ConfigError(
                f"batch_size {cfg.batch_size} equals num_instances {k}: every P x K batch would hold one "
                "identity, so mining finds no negative and the OT term is always 0; use a batch_size of "
                "at least 2 * num_instances"
            )
        if cfg.get("dali"):
            raise ConfigError(f"sampler {sampler!r} does not work with dali: true (DALI reads the .rec itself)")
        cfg.num_instances = k
