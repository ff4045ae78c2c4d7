"""One small registry with kinds, in the style of timm's ``register_model`` / ``create_model``.

Each kind (:data:`KINDS`) is a table name -> factory: ``loss`` (what ``build_loss`` builds and a
config's ``loss:`` names) and ``head`` (the margin functions a ``loss:`` or OTFace's ``margin=``
may name; each head also registers its standalone loss). Names are stripped and lower-cased.

The built-in entries are imported on the first lookup, from the module each kind names, so that
``import otface_plugin`` (the installer, the data tools) does not import torch. Other installed
packages add losses through the entry-point group ``otface_plugin.losses``; each entry point
names a callable (usually an ``nn.Module`` subclass) taking keyword options.
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from importlib import metadata
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional


class Kind(NamedTuple):
    builtins: str  # module whose import registers the built-in entries
    entry_point_group: Optional[str]  # installed packages' entries (None: code registers them)


KINDS: Dict[str, Kind] = {
    "loss": Kind("otface_plugin.losses", "otface_plugin.losses"),
    "head": Kind("otface_plugin.losses", None),  # a head registers with @register_head, which needs the import
}
ENTRY_POINT_GROUP = KINDS["loss"].entry_point_group

_ENTRIES: Dict[str, Dict[str, Callable]] = {kind: {} for kind in KINDS}
_BROKEN: Dict[str, str] = {}  # loss entry points that failed to load: name -> reason
_entry_points_loaded = False


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that no module or installed package registered under its kind (a
    KeyError as the loss lookups always raised, and a ValueError as ``build_margin`` did)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


UnknownLossError = UnknownNameError  # what the loss lookups raise; the recipe and the CLIs catch it by this name


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    """Class or function decorator: record it as ``name`` in the ``kind`` table."""
    table, key = _table(kind), _normalise(name, kind)

    def decorator(factory: Callable) -> Callable:
        existing = table.get(key)
        if existing is not None and existing is not factory:
            raise ValueError(f"{kind} {name!r} is already registered by {_describe(existing)}")
        table[key] = factory
        return factory

    return decorator


def view(kind: str) -> Mapping[str, Callable]:
    """Read-only live view of the ``kind`` table (name -> factory), as registered so far."""
    return MappingProxyType(_table(kind))


def entries(kind: str) -> Mapping[str, Callable]:
    """:func:`view` of ``kind`` with the built-ins and installed packages' entries loaded."""
    _load()
    return view(kind)


def lookup(kind: str, name: str) -> Callable:
    """The factory registered as ``name`` under ``kind``; :class:`UnknownNameError` listing the
    registered names otherwise (ImportError for a loss whose entry point failed to load)."""
    return _table(kind)[registered_name(name, kind)]


def registered_name(name: str, kind: str = "loss") -> str:
    """The registry's key for ``name`` (stripped, lower case), checked to exist under ``kind``."""
    _load()
    key = _normalise(name, kind)
    table = _table(kind)
    if kind == "loss" and key in _BROKEN and key not in table:
        raise ImportError(f"loss {name!r} is provided by an installed package but failed to load: {_BROKEN[key]}")
    if key not in table:
        plural = "losses" if kind == "loss" else f"{kind}s"
        raise UnknownNameError(f"unknown {kind} {name!r}; registered {plural}: {', '.join(sorted(table))}")
    return key


def register_loss(name: str) -> Callable[[Callable], Callable]:
    """Class or function decorator: make ``build_loss(name, ...)`` construct it."""
    return register("loss", name)


def available_losses() -> List[str]:
    """Sorted names of every registered loss, entry-point ones included."""
    return sorted(entries("loss"))


def build_loss(name: str, **options):
    """Build the loss registered as ``name`` with ``options``.

    Unknown names and unknown options are errors: a typo in a config must not silently fall back
    to a default.
    """
    factory = lookup("loss", name)
    check_options(f"loss {name!r}", factory, options)
    return factory(**options)


def check_options(what: str, factory: Callable, options: dict) -> None:
    """TypeError naming the options ``factory`` does not accept (``what`` names it): those of its
    signature, or of its ``accepted_options()`` when it declares them (a factory taking ``**options``
    that it hands on, such as a head's standalone loss)."""
    declared = getattr(factory, "accepted_options", None)
    if callable(declared) and not inspect.isclass(factory):
        refuse_unknown(what, options, list(declared()))
        return
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n for n, p in params.items()
        if n != "self" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    refuse_unknown(what, options, accepted)


def refuse_unknown(what: str, options: dict, accepted: List[str]) -> None:
    """TypeError naming the ``options`` not in ``accepted``, and listing those (``what`` names the callee)."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"unknown option(s) for {what}: {', '.join(unknown)}; "
                        f"accepted options: {', '.join(accepted)}")


def _table(kind: str) -> Dict[str, Callable]:
    if kind not in _ENTRIES:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    return _ENTRIES[kind]


def _normalise(name: str, kind: str = "loss") -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"a {kind} name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def _describe(factory: Callable) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def _load() -> None:
    global _entry_points_loaded
    for module in {k.builtins for k in KINDS.values()}:
        importlib.import_module(module)
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for kind, spec in KINDS.items():
        if spec.entry_point_group is None:
            continue
        table = _ENTRIES[kind]
        for ep in metadata.entry_points(group=spec.entry_point_group):
            key = _normalise(ep.name, kind)
            if key in table:
                continue
            try:
                table[key] = ep.load()
            except Exception as exc:
                # A broken third-party package must not take the built-in losses down with it; the
                # error surfaces when that loss is asked for.
                _BROKEN[key] = f"entry point {ep.value!r} in group {spec.entry_point_group!r}: {type(exc).__name__}: {exc}"
                warnings.warn(f"otface_plugin: {kind} {ep.name!r} failed to load ({_BROKEN[key]})", RuntimeWarning)
