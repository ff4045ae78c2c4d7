"""A small loss registry in the style of timm's ``register_model`` / ``create_model``.

Other installed packages add losses through the entry-point group ``otface_plugin.losses``;
each entry point names a callable (usually an ``nn.Module`` subclass) taking keyword options.
"""
from __future__ import annotations

import inspect
import warnings
from importlib import metadata
from typing import Callable, Dict, List

ENTRY_POINT_GROUP = "otface_plugin.losses"

_LOSSES: Dict[str, Callable] = {}
_BROKEN: Dict[str, str] = {}  # entry points that failed to load: name -> reason
_entry_points_loaded = False


class UnknownLossError(KeyError):
    """Raised for a loss name that no module or installed package registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_loss(name: str) -> Callable[[Callable], Callable]:
    """Class or function decorator: make ``build_loss(name, ...)`` construct it."""
    key = _normalise(name)

    def decorator(factory: Callable) -> Callable:
        existing = _LOSSES.get(key)
        if existing is not None and existing is not factory:
            raise ValueError(f"loss {name!r} is already registered by {_describe(existing)}")
        _LOSSES[key] = factory
        return factory

    return decorator


def available_losses() -> List[str]:
    """Sorted names of every registered loss, entry-point ones included."""
    _load_builtin_and_entry_points()
    return sorted(_LOSSES)


def build_loss(name: str, **options):
    """Build the loss registered as ``name`` with ``options``.

    Unknown names and unknown options are errors: a typo in a config must not silently fall back
    to a default.
    """
    factory = _LOSSES[registered_name(name)]
    _check_options(name, factory, options)
    return factory(**options)


def registered_name(name: str) -> str:
    """The registry's key for ``name`` (stripped, lower case); :class:`UnknownLossError` for a
    name nothing registered, ImportError for an entry point that failed to load."""
    _load_builtin_and_entry_points()
    key = _normalise(name)
    if key in _BROKEN and key not in _LOSSES:
        raise ImportError(f"loss {name!r} is provided by an installed package but failed to load: {_BROKEN[key]}")
    if key not in _LOSSES:
        raise UnknownLossError(
            f"unknown loss {name!r}; registered losses: {', '.join(available_losses())}"
        )
    return key


def _normalise(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"a loss name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def _describe(factory: Callable) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def _check_options(name: str, factory: Callable, options: dict) -> None:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {
        n for n, p in params.items()
        if n != "self" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(
            f"unknown option(s) for loss {name!r}: {', '.join(unknown)}; "
            f"accepted options: {', '.join(sorted(accepted))}"
        )


def _load_builtin_and_entry_points() -> None:
    global _entry_points_loaded
    import otface_plugin.losses  # noqa: F401  (registers the built-in losses)

    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in eps:
        key = _normalise(ep.name)
        if key in _LOSSES:
            continue
        try:
            _LOSSES[key] = ep.load()
        except Exception as exc:
            # A broken third-party package must not take the built-in losses down with it; the
            # error surfaces when that loss is asked for.
            _BROKEN[key] = f"entry point {ep.value!r} in group {ENTRY_POINT_GROUP!r}: {type(exc).__name__}: {exc}"
            warnings.warn(f"otface_plugin: loss {ep.name!r} failed to load ({_BROKEN[key]})", RuntimeWarning)
