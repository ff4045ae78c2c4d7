"""``otface-train``: run an unmodified arcface_torch checkout with the plugin's patches applied in
memory, for users who cannot (or do not want to) change their checkout.

    otface-train CONFIG --arcface-root DIR                    # = python train_v2.py CONFIG
    torchrun --nproc_per_node=8 $(which otface-train) CONFIG --arcface-root DIR
    otface-train --arcface-root DIR --run torch2onnx.py MODEL.pt --network r50

The same unified diffs that ``otface-install`` writes to disk are applied to the upstream
sources as they are imported (an import finder on ``sys.meta_path`` serves the patched text
under the files' real paths, so tracebacks point at the right lines), then ``train_v2.py`` runs
as ``__main__``. Before anything runs, every upstream file the plugin's calls rely on is
checked against its pinned git blob id: an unknown upstream version is refused, naming the
files that differ.

CONFIG is looked up like train_v2.py does (``configs/NAME`` in the checkout); the plugin's own
example configs (``configs/ms1mv3_r50_otface`` ...) are found too, without copying them.

Exit status: 0 done, 1 the run stopped on an expected failure (a missing file, NaN/inf
features), 2 refused checkout, bad config or a missing dependency of the recipe (named, with the
package to install); each is one line on stderr, not a traceback. 74: done, but the output to
stdout was lost (see ``otface_plugin.cli_output``).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import linecache
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from otface_plugin.arcface_torch import installer
from otface_plugin.cli_output import run_cli
from otface_plugin.arcface_torch.pins import UPSTREAM_BLOBS, UPSTREAM_COMMIT, UPSTREAM_UNPATCHED_BLOBS
from otface_plugin.arcface_torch.shipped import shipped_dir


class RefusedCheckout(RuntimeError):
    pass


def patched_sources(root: Path) -> Dict[str, bytes]:
    """Relative path -> patched bytes, after checking every pinned file's blob id."""
    differ = installer.describe_differences(root, {**UPSTREAM_BLOBS, **UPSTREAM_UNPATCHED_BLOBS})
    if differ:
        hint = ""
        try:
            if installer.check(root)[0] == installer.Status.INSTALLED:
                hint = ". This checkout is already patched by otface-install: run its train_v2.py directly"
        except Exception:  # the hint is best effort; the refusal itself is what matters
            pass
        raise RefusedCheckout(
            f"{root} is not the arcface_torch version otface-train knows (commit {UPSTREAM_COMMIT[:10]}); "
            "files that differ: " + "; ".join(differ) + hint
        )
    # every pinned file is pristine here, so the installer's view holds the patched bytes
    return {state.path: state.patched for state in installer.inspect_checkout(root)}


def module_name(rel: str) -> str:
    return rel[:-3].replace("/", ".")


class PatchedSourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the patched text of the upstream modules; everything else imports normally."""

    def __init__(self, root: Path, sources: Dict[str, bytes]) -> None:
        self.root = root
        self.sources = {module_name(rel): (root / rel, data) for rel, data in sources.items()}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.sources:
            return None
        origin, _ = self.sources[fullname]
        return importlib.util.spec_from_loader(fullname, self, origin=str(origin))

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        origin, data = self.sources[module.__name__]
        module.__file__ = str(origin)
        exec(_compile(data, origin), module.__dict__)


def prepare(root: Path) -> PatchedSourceFinder:
    """Check the checkout, put it first on sys.path and install the import finder."""
    root = root.expanduser().resolve()
    if not (root / "train_v2.py").is_file():
        raise RefusedCheckout(f"{root} has no train_v2.py: give the recognition/arcface_torch directory")
    finder = PatchedSourceFinder(root, patched_sources(root))
    sys.path.insert(0, str(root))
    sys.meta_path.insert(0, finder)
    _add_shipped_configs()
    return finder


def _add_shipped_configs() -> None:
    """Let ``configs/NAME`` also find the plugin's example configs (the checkout's win)."""
    import configs  # the checkout's package

    try:
        extra = os.fspath(shipped_dir("configs"))
    except (FileNotFoundError, TypeError):  # not a plain directory (zipped install): skip
        return
    if extra not in configs.__path__:
        configs.__path__.append(extra)


def run_script(finder: PatchedSourceFinder, script: str, argv: Sequence[str]) -> None:
    """Run an upstream script (patched if the patches touch it) as ``__main__``."""
    path = (finder.root / script).resolve()
    name = module_name(os.path.relpath(path, finder.root).replace(os.sep, "/"))
    if name in finder.sources:
        data = finder.sources[name][1]
    elif path.is_file():
        data = path.read_bytes()
    else:
        raise FileNotFoundError(f"{path}: no such upstream script")
    sys.argv = [str(path), *argv]
    globals_ = {"__name__": "__main__", "__file__": str(path), "__builtins__": __builtins__}
    exec(_compile(data, path), globals_)


def _compile(data: bytes, path: Path):
    # tracebacks and inspect read lines through linecache: give it the patched text, not the
    # file on disk (an entry without mtime is never reloaded from disk)
    text = data.decode("utf-8")
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    return compile(data, str(path), "exec")


# import name -> the distribution that provides it, where the two differ (else the same name)
PIP_NAMES = {"sklearn": "scikit-learn", "yaml": "PyYAML", "cv2": "opencv-python-headless",
             "PIL": "pillow", "skimage": "scikit-image"}


def missing_dependency(exc: ImportError) -> str:
    """One line for an import the recipe needs and this environment lacks: the module and the
    package that provides it. A wrapped import error (torch's "TensorBoard logging requires
    TensorBoard") is traced to the ModuleNotFoundError behind it."""
    cause: Optional[BaseException] = exc
    while cause is not None and not (isinstance(cause, ModuleNotFoundError) and cause.name):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return f"cannot import what the recipe needs: {' '.join(str(exc).split())}"
    top = cause.name.split(".")[0]
    return (f"missing module {cause.name!r} (imported by the recipe or its config): "
            f"pip install {PIP_NAMES.get(top, top)} (the recipe's whole environment: "
            "'The training environment' in otface-plugin's docs/integration.md)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli("otface-train", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(
        prog="otface-train",
        description="Run arcface_torch's train_v2.py (or another of its scripts) with the otface-plugin "
        "patches applied in memory; the checkout is not modified.",
    )
    parser.add_argument("config", nargs="?", help="job config, e.g. configs/ms1mv3_r50_otface or configs/job.yaml")
    parser.add_argument("--arcface-root", required=True, type=Path,
                        help="insightface/recognition/arcface_torch (pinned, unmodified)")
    parser.add_argument("--run", metavar="SCRIPT", help="run this upstream script instead of train_v2.py; "
                        "the remaining arguments go to it")
    args, rest = parser.parse_known_args(argv)
    if not args.run:
        if not args.config:
            parser.error("give a CONFIG (or --run SCRIPT)")
        if rest:
            parser.error(f"unknown arguments for train_v2.py: {' '.join(rest)}")
    from otface_plugin.arcface_torch.checkpoint import CheckpointError
    from otface_plugin.arcface_torch.config import ConfigError
    from otface_plugin.mining import NonFiniteError
    from otface_plugin.registry import UnknownLossError

    try:
        finder = prepare(args.arcface_root)
        if args.run:
            run_script(finder, args.run, ([args.config] if args.config else []) + rest)
        else:
            run_script(finder, "train_v2.py", [args.config])
    except RefusedCheckout as exc:
        print(f"otface-train: refused: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, UnknownLossError) as exc:
        print(f"otface-train: bad config: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NonFiniteError, CheckpointError) as exc:
        print(f"otface-train: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("configs."):  # get_config imports configs.NAME
            print(f"otface-train: bad config: no config {args.config} (looked for module {exc.name} in "
                  f"{Path(args.arcface_root).resolve() / 'configs'} and the plugin's example configs)",
                  file=sys.stderr)
        else:
            print(f"otface-train: {missing_dependency(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"otface-train: {missing_dependency(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
