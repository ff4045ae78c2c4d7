"""Apply, check or revert the plugin's patches on an arcface_torch checkout.

    otface-install ARCFACE_TORCH_DIR [--check] [--dry-run] [--revert]

Before touching anything it checks the git blob id of every file the patches change against the
pinned upstream version and refuses, naming the files that differ. It writes all files or none
(a failure half-way puts back every file it had written), a second run reports "already
installed", and --revert restores the upstream files byte for byte. The example configs are
copied into the checkout's configs/ and listed in a manifest, so --revert removes exactly those.
New files get the mode the umask gives (0666 minus the umask), files it replaces keep theirs.
Temp files (``.NAME.*.otface-tmp``) a killed run left beside the files it writes are removed
by the next install or revert.

Exit status: 0 done / installed, 1 not installed (--check), 2 refused (nothing changed),
3 failed on a file system error (the message says what was put back), 130 interrupted (SIGINT
or SIGTERM: the writes are never cut in two, so the message says whether they were done or not
begun), 74 done but the report to stdout was lost (see ``otface_plugin.cli_output``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import otface_plugin
from otface_plugin.atomicfile import atomic_write
from otface_plugin.cli_output import outcome, run_cli
from otface_plugin.interrupts import signals_deferred, sigterm_as_interrupt
from otface_plugin.arcface_torch.patchset import (
    PatchError,
    apply_all,
    git_blob_id,
    load_patches,
    patches_by_file,
)
from otface_plugin.arcface_torch.pins import UPSTREAM_BLOBS, UPSTREAM_COMMIT, UPSTREAM_REPO, UPSTREAM_SUBDIR
from otface_plugin.arcface_torch.shipped import shipped_dir

MANIFEST = ".otface_plugin_install.json"
TEMP_SUFFIX = ".otface-tmp"


class _Printed(str, Enum):
    """A str-valued state: compares equal to, and prints as, its value ("installed", ...)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class FileKind(_Printed):
    """What one file the patches touch is in a checkout."""
    PRISTINE = "pristine"  # the pinned upstream bytes
    PATCHED = "patched"  # upstream with this version's patches
    MODIFIED = "modified"  # anything else: refused
    MISSING = "missing"


class Status(_Printed):
    """A checkout as a whole (``otface-install --check``)."""
    INSTALLED = "installed"
    NOT_INSTALLED = "not installed"
    PARTIAL = "partially installed"
    REFUSED = "refused"


PRISTINE, PATCHED, MODIFIED, MISSING = FileKind  # short names used below


class InstallRefused(RuntimeError):
    """The checkout is not one the patches can be applied to (or reverted from)."""


class InstallFailed(OSError):
    """A write failed half-way; the message says what was put back (and what could not be)."""


@dataclass
class FileState:
    path: str
    state: FileKind
    current: Optional[bytes]
    pristine: Optional[bytes] = None  # upstream bytes (known unless MODIFIED / MISSING)
    patched: Optional[bytes] = None  # bytes with the patches applied


@dataclass
class Plan:
    """Everything an install or revert would write: path -> new bytes (None = delete)."""
    writes: Dict[str, Optional[bytes]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def inspect_checkout(root: Path, patch_names: Optional[Sequence[str]] = None) -> List[FileState]:
    """Classify every file the patches touch as pristine, patched, modified or missing."""
    by_file = patches_by_file(load_patches(patch_names))
    unknown = sorted(set(by_file) - set(UPSTREAM_BLOBS))
    if unknown:  # a packaging error, not a user error
        raise RuntimeError(f"patches touch files without a pinned blob id: {unknown}")
    states = []
    for path in sorted(by_file):
        file = root / path
        if not file.is_file():
            states.append(FileState(path, MISSING, None))
            continue
        data = file.read_bytes()
        if git_blob_id(data) == UPSTREAM_BLOBS[path]:
            states.append(FileState(path, PRISTINE, data, data, apply_all(by_file[path], data)))
            continue
        try:  # patched by us: undoing the patches must give the pinned upstream bytes back
            original = apply_all(by_file[path], data, reverse=True)
        except (PatchError, UnicodeDecodeError):
            original = None
        if original is not None and git_blob_id(original) == UPSTREAM_BLOBS[path]:
            states.append(FileState(path, PATCHED, data, original, data))
        else:
            states.append(FileState(path, MODIFIED, data))
    return states


def shipped_configs() -> Dict[str, bytes]:
    """The example configs (python and YAML) to copy into configs/, by file name."""
    folder = shipped_dir("configs")
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith((".py", ".yaml", ".yml")) and p.name != "__init__.py"
    }


# what a manifest may name: a file directly in configs/ (revert deletes what it names)
_CONFIG_ENTRY = re.compile(r"configs/[^/\\]+")
_BLOB_ID = re.compile(r"[0-9a-f]{40}")


def read_manifest(root: Path) -> dict:
    """The manifest of an earlier install, checked: it decides which files --revert deletes, so
    an entry outside configs/ (``../x``) or a malformed one refuses instead of being obeyed."""
    path = root / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:
        raise InstallRefused(f"{path} is not a manifest otface-install wrote ({exc}); "
                             "remove it or restore it") from None
    configs = manifest.get("configs", {}) if isinstance(manifest, dict) else None
    if not isinstance(configs, dict):
        raise InstallRefused(f"{path} is not a manifest otface-install wrote (no 'configs' table); "
                             "remove it or restore it")
    for rel, blob in configs.items():
        if (not _CONFIG_ENTRY.fullmatch(rel) or rel in ("configs/.", "configs/..")
                or not isinstance(blob, str) or not _BLOB_ID.fullmatch(blob)):
            raise InstallRefused(f"{path} is not a manifest otface-install wrote (entry {rel!r}: "
                                 "not a file in configs/ with a blob id); remove it or restore it")
    return manifest


def describe_differences(root: Path, pinned: Dict[str, str]) -> List[str]:
    """``path: missing``, ``path: not a regular file`` or ``path: modified (blob X, pinned Y)``
    for each file of ``pinned`` (path -> git blob id) that ``root`` does not hold as pinned."""
    found = []
    for rel, blob in sorted(pinned.items()):
        f = root / rel
        if not f.exists() and not f.is_symlink():
            found.append(f"{rel}: missing")
        elif not f.is_file():
            found.append(f"{rel}: not a regular file")
        else:
            have = git_blob_id(f.read_bytes())
            if have != blob:
                found.append(f"{rel}: modified (blob {have[:10]}, pinned {blob[:10]})")
    return found


def _refuse_modified(states: Sequence[FileState], root: Path) -> None:
    bad = [s for s in states if s.state in (MODIFIED, MISSING)]
    if bad:
        differ = describe_differences(root, {s.path: UPSTREAM_BLOBS[s.path] for s in bad})
        raise InstallRefused(
            f"{root} is not the arcface_torch version these patches are for "
            f"({UPSTREAM_REPO}@{UPSTREAM_COMMIT[:10]}, {UPSTREAM_SUBDIR}); files that differ: "
            f"{'; '.join(differ)}. Nothing was changed. Check out the pinned version of these files, "
            "or use the no-patch route (otface-train) on a pinned checkout."
        )


def plan_install(root: Path, patch_names: Optional[Sequence[str]] = None, configs: bool = True) -> Plan:
    root = _check_root(root)
    states = inspect_checkout(root, patch_names)
    _refuse_modified(states, root)
    plan = Plan()
    for s in states:
        if s.state == PRISTINE:
            plan.writes[s.path] = s.patched
    if configs:
        manifest = read_manifest(root)
        recorded = manifest.get("configs", {})
        new_manifest = {"configs": {}}
        clashes = []
        for name, data in shipped_configs().items():
            rel = f"configs/{name}"
            dest = root / rel
            new_manifest["configs"][rel] = git_blob_id(data)
            if not dest.exists() and not dest.is_symlink():
                plan.writes[rel] = data
            elif not dest.is_file():  # a folder, a FIFO (reading it would block), a broken link
                clashes.append(rel)
            elif dest.read_bytes() == data:
                continue
            elif git_blob_id(dest.read_bytes()) == recorded.get(rel):
                plan.writes[rel] = data  # our copy from an older plugin version: update it
            else:
                clashes.append(rel)
        if clashes:
            raise InstallRefused(
                f"these files exist in {root} and were not written by otface-install: "
                f"{', '.join(clashes)}; move them away first (nothing was changed)"
            )
        manifest_data = _manifest_bytes(new_manifest)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file() or manifest_path.read_bytes() != manifest_data:
            plan.writes[MANIFEST] = manifest_data
        for rel in sorted(set(recorded) - set(new_manifest["configs"])):  # dropped by this version
            if (root / rel).is_file() and git_blob_id((root / rel).read_bytes()) == recorded[rel]:
                plan.writes[rel] = None
    return plan


def plan_revert(root: Path) -> Plan:
    root = _check_root(root)
    states = inspect_checkout(root)
    _refuse_modified(states, root)
    plan = Plan()
    for s in states:
        if s.state == PATCHED:
            plan.writes[s.path] = s.pristine
    manifest = read_manifest(root)
    for rel, blob in sorted(manifest.get("configs", {}).items()):
        dest = root / rel
        if not dest.is_file():
            continue
        if git_blob_id(dest.read_bytes()) == blob:
            plan.writes[rel] = None
        else:
            plan.notes.append(f"kept {rel}: changed since otface-install copied it")
    if (root / MANIFEST).exists():
        plan.writes[MANIFEST] = None
    return plan


def _manifest_bytes(manifest: dict) -> bytes:
    manifest = {
        "plugin": "otface-plugin",
        "version": otface_plugin.__version__,
        "upstream": f"{UPSTREAM_REPO}@{UPSTREAM_COMMIT}",
        **manifest,
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_root(root: Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not (root / "train_v2.py").is_file():
        raise InstallRefused(f"{root} has no train_v2.py: give the recognition/arcface_torch directory")
    return root


def execute(root: Path, plan: Plan) -> None:
    """Write the plan all or nothing: on any failure every file already written is put back.

    An ``OSError`` becomes :class:`InstallFailed`, whose one-line message names the file that
    failed and the files put back; a file is "put back" only if it had changed, and "could not
    restore" is said only of a file that still differs from its old bytes.
    """
    root = Path(root).resolve()
    done: List[Tuple[str, Optional[bytes], Optional[int]]] = []  # rel, old bytes, old mode
    rel = ""
    try:
        for rel, data in plan.writes.items():
            path = root / rel
            old = path.read_bytes() if path.exists() else None
            mode = path.stat().st_mode if path.exists() else None
            done.append((rel, old, mode))  # before the write: a write interrupted after its rename is undone too
            if data is None:
                path.unlink()
            else:
                _atomic_write(path, data, mode)
    except BaseException as exc:
        restored, failed = _roll_back(root, done)
        if not isinstance(exc, OSError):  # e.g. KeyboardInterrupt: re-raised as it is
            for f in failed:
                print(f"otface-install: could not restore {f}", file=sys.stderr)
            raise
        what = "remove" if plan.writes.get(rel, b"") is None else "write"
        msg = f"cannot {what} {rel}: {exc.strerror or exc}"
        msg += f"; put back {', '.join(restored)}" if restored else "; no file had been changed yet"
        if failed:
            msg += f"; could NOT restore {'; '.join(failed)}: compare them with upstream"
        else:
            msg += f": {root} is as it was"
        raise InstallFailed(msg) from exc


def _roll_back(root: Path, done) -> Tuple[List[str], List[str]]:
    """Put back what ``execute`` changed; returns (restored, could-not-restore) relative paths."""
    restored, failed = [], []
    for rel, old, mode in reversed(done):
        path = root / rel
        try:
            if _unchanged(path, old, mode):
                continue  # never written (the failing file itself, usually): nothing to put back
            if old is None:
                path.unlink()
            else:
                _atomic_write(path, old, mode)
            restored.append(rel)
        except OSError as exc:  # keep restoring the rest
            failed.append(f"{rel} ({exc.strerror or exc})")
    return restored[::-1], failed[::-1]


def _unchanged(path: Path, old: Optional[bytes], mode: Optional[int]) -> bool:
    if old is None:
        return not path.exists()
    return path.is_file() and path.stat().st_mode == mode and path.read_bytes() == old


def _atomic_write(path: Path, data: bytes, mode: Optional[int]) -> None:
    # a crash leaves the old or the new file, never half; a new file (mode None) gets 0666 minus
    # the umask; our suffix lets stale_temp_files() find what a killed run left
    atomic_write(path, data, mode=mode, suffix=TEMP_SUFFIX)


def stale_temp_files(root: Path) -> List[Path]:
    """Temp files of ours that a killed install or revert left beside the files it writes."""
    folders = {root, root / "configs", *((root / rel).parent for rel in UPSTREAM_BLOBS)}
    found = []
    for folder in sorted(folders):
        if folder.is_dir():
            found += [p for p in sorted(folder.glob(f".*{TEMP_SUFFIX}")) if p.is_file() and not p.is_symlink()]
    return found


def _clean_temp_files(root: Path, plan: Plan, dry_run: bool) -> None:
    root = Path(root).expanduser().resolve()
    for tmp in stale_temp_files(root):
        rel = tmp.relative_to(root)
        if dry_run:
            plan.notes.append(f"would remove {rel} (left by an interrupted run)")
            continue
        try:
            tmp.unlink(missing_ok=True)
        except OSError as exc:  # a leftover is harmless: say so and go on, rather than fail the install
            plan.notes.append(f"could not remove {rel} (left by an interrupted run): {exc.strerror or exc}")
        else:
            plan.notes.append(f"removed {rel} (left by an interrupted run)")


def _describe(plan: Plan, verb: str) -> str:
    lines = []
    for rel, data in plan.writes.items():
        what = "remove" if data is None else verb
        lines.append(f"  {what} {rel}")
    lines += [f"  {n}" for n in plan.notes]
    return "\n".join(lines)


def install(root: Path, dry_run: bool = False, patch_names: Optional[Sequence[str]] = None,
            configs: bool = True) -> Plan:
    plan = plan_install(root, patch_names, configs)
    _apply(root, plan, dry_run)
    return plan


def revert(root: Path, dry_run: bool = False) -> Plan:
    plan = plan_revert(root)
    _apply(root, plan, dry_run)
    return plan


def _apply(root: Path, plan: Plan, dry_run: bool, applied: Optional[List[bool]] = None) -> None:
    """Remove stale temp files and write the plan. SIGINT/SIGTERM wait until both are done (a
    few milliseconds), so an interrupt never splits them; ``applied`` gets True appended inside
    that window, so a caller that sees the deferred interrupt knows the writes were made."""
    with signals_deferred():
        _clean_temp_files(root, plan, dry_run)
        if not dry_run:
            execute(root, plan)
        if applied is not None:
            applied.append(True)


def check(root: Path) -> Tuple[Status, List[FileState]]:
    """The checkout's :class:`Status` and the file states."""
    root = _check_root(root)
    states = inspect_checkout(root)
    kinds = {s.state for s in states}
    if kinds & {MODIFIED, MISSING}:
        return Status.REFUSED, states
    if kinds == {PATCHED}:
        return Status.INSTALLED, states
    if kinds == {PRISTINE}:
        return Status.NOT_INSTALLED, states
    return Status.PARTIAL, states


def copy_checkout(src: Path, dst: Path) -> Path:
    """Copy a checkout to ``dst`` for patching, writable by its owner even when ``src`` is a
    read-only (shared, or CI-laid) tree: copytree keeps the source's modes."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "work_dirs", ".git"))
    for p in [dst, *Path(dst).rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if p.is_dir() else 0))
    return Path(dst)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli("otface-install", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(
        prog="otface-install",
        description="Patch an InsightFace recognition/arcface_torch checkout so that its train_v2.py "
        "can use the OTFace loss (config.loss = 'otface'), and copy the example configs.",
    )
    parser.add_argument("arcface_torch_dir", type=Path, help="path to insightface/recognition/arcface_torch")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report whether the patches are installed; change nothing")
    mode.add_argument("--revert", action="store_true", help="restore the upstream files and remove the copied configs")
    parser.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    args = parser.parse_args(argv)
    root = args.arcface_torch_dir
    where, version = Path(root).resolve(), otface_plugin.__version__
    applied: List[bool] = []
    what = "revert" if args.revert else "install"
    try:
        with sigterm_as_interrupt():  # a kill by a scheduler gets the same truthful message as Ctrl-C
            if args.check:
                status, states = check(root)
                outcome(f"{status} in {where}")
                for s in states:
                    print(f"  {s.path}: {s.state}")
                print(f"otface-plugin {version}: {status} in {where}")
                return {Status.INSTALLED: 0, Status.REFUSED: 2}.get(status, 1)
            if args.revert:
                plan = plan_revert(root)
                _apply(root, plan, args.dry_run, applied)
                done = f"{'would revert' if args.dry_run else 'reverted'} {where}"
                outcome(done if plan.writes else f"nothing to revert in {where}")
                _report(plan, f"nothing to revert in {where} (not installed)", done, "restore")
            else:
                plan = plan_install(root)
                _apply(root, plan, args.dry_run, applied)
                done = f"{'would install' if args.dry_run else 'installed'} otface-plugin {version} in {where}"
                outcome(done if plan.writes else f"otface-plugin {version} already installed in {where}")
                _report(plan, f"otface-plugin {version} already installed in {where}", done, "write")
            return 0
    except KeyboardInterrupt:
        if args.check or args.dry_run:
            state = "nothing was changed"
        elif applied:
            state = f"the {what} was complete ({where} is {'reverted' if args.revert else 'installed'})"
        else:
            state = f"before any file was written; {where} is as it was"
        print(f"otface-install: interrupted; {state}", file=sys.stderr)
        return 130
    except InstallRefused as exc:
        print(f"otface-install: refused: {exc}", file=sys.stderr)
        return 2
    except InstallFailed as exc:
        print(f"otface-install: failed: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # reading the checkout (planning): nothing was written yet
        reason = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc
        print(f"otface-install: failed: {reason}; nothing was changed", file=sys.stderr)
        return 3


def _report(plan: Plan, nothing: str, done: str, action: str) -> None:
    """``done`` and each file the plan writes, or, when it writes nothing, ``nothing`` and its notes."""
    if plan.writes:
        print(f"{done}:\n{_describe(plan, action)}")
        return
    print(nothing)
    for note in plan.notes:
        print(f"  {note}")


if __name__ == "__main__":
    sys.exit(main())
