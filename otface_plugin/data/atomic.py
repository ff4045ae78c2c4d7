"""Write a set of outputs all-or-nothing, also when the process is killed.

New contents go to hidden temp files next to their final paths (same filesystem, so renames are
atomic). A single output is then renamed into place. Several outputs (``.rec`` + ``.idx`` +
``property``, two identity lists) are committed under a journal, because no rename covers two
files:

1. write the journal ``.<first name>.otface-commit`` (the outputs, the backup name of each one
   that exists, the pid);
2. rename the existing outputs to their backups, the first output (the marker) first;
3. rename the new files into place, the marker last;
4. delete the backups, then the journal.

So the marker exists only while the old outputs are untouched or the new ones are all in place;
``.rec`` is the marker of a ``.rec``/``.idx`` pair, so a ``.rec`` never sits next to an ``.idx``
of another build. SIGINT/SIGTERM are held back during steps 2-4. A process killed in steps 2-3
(SIGKILL, power loss of an un-synced file aside) leaves the marker missing and the journal
behind; the next :func:`atomic_outputs` on those paths puts the previous outputs back (or
removes the new ones when there were none) before it starts, and deletes the temp files of dead
processes. Temp files are ``.<name>.<pid>.<random>.partial``, backups the same with ``.old``
(both named by :func:`otface_plugin.atomicfile.temp_path`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence

from otface_plugin.atomicfile import TEMP_SUFFIX, atomic_write, create_new, discard, temp_path
from otface_plugin.interrupts import signals_deferred

__all__ = ["atomic_outputs", "recover_outputs"]

_BACKUP, _JOURNAL = ".old", ".otface-commit"
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _journal(marker: Path) -> Path:
    return marker.with_name(f".{marker.name}{_JOURNAL}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _write_journal(path: Path, plan: List[dict]) -> None:
    atomic_write(path, json.dumps({"pid": os.getpid(), "outputs": plan}))


def _undo(journal: Path) -> None:
    """Finish an interrupted commit recorded in ``journal``: with the marker in place the
    outputs are complete (old or new), so only backups go; without it, restore the backups
    and remove new outputs that had no previous version. Idempotent: safe to rerun after
    being killed itself."""
    try:
        data = json.loads(journal.read_text(encoding="utf-8", errors="surrogateescape"))
        pid, plan = int(data["pid"]), data["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileExistsError(f"{journal}: unreadable record of an interrupted write ({e}); "
                              f"check the outputs next to it, then delete it") from None
    if pid != os.getpid() and _alive(pid):
        raise FileExistsError(f"{journal}: another process (pid {pid}) is writing these "
                              f"outputs; wait for it, or delete the file if it is not running")
    marker = Path(plan[0]["final"])
    if not marker.exists():
        for item in plan[1:] + plan[:1]:  # the marker last, as in a commit
            final, backup = Path(item["final"]), item["backup"]
            if backup is None:
                discard(final)  # a new output that had no previous version
            elif os.path.lexists(backup):
                os.replace(backup, final)
            # else: the previous output was never moved aside
    for item in plan:
        if item["backup"] is not None:
            discard(Path(item["backup"]))
    discard(journal)


def _is_stale(name: str, prefix: str) -> bool:
    """Whether ``name`` is a temp file or backup of the output ``prefix`` names whose writer is
    gone: ``<prefix><pid>.<8 hex>.partial|.old`` of a dead pid, or ``<prefix><8 chars>.partial``
    (older versions' mkstemp names, which carry no pid)."""
    suffix = next((s for s in (TEMP_SUFFIX, _BACKUP) if name.endswith(s)), None)
    if suffix is None or not name.startswith(prefix):
        return False
    parts = name[len(prefix):-len(suffix)].split(".")
    if len(parts) == 2 and parts[0].isdigit() and len(parts[1]) == 8:
        return not _alive(int(parts[0]))
    return len(parts) == 1 and len(parts[0]) == 8 and suffix == TEMP_SUFFIX


def recover_outputs(finals: Sequence[os.PathLike]) -> None:
    """Undo an interrupted commit of ``finals`` and delete temp files left by dead writers."""
    finals = [Path(f) for f in finals]
    if finals and os.path.lexists(_journal(finals[0])):
        _undo(_journal(finals[0]))
    for f in finals:
        try:
            entries = os.listdir(f.parent)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in entries:
            # (the second prefix: the temp file of a journal whose write was killed)
            if _is_stale(name, f".{f.name}.") or _is_stale(name, f".{_journal(f).name}."):
                discard(f.parent / name)


def _commit(temps: Dict[Path, Path]) -> None:
    finals = list(temps)
    if len(finals) == 1:
        os.replace(temps[finals[0]], finals[0])
        return
    journal = _journal(finals[0])
    plan = [{"final": os.fspath(f),
             "backup": os.fspath(temp_path(f, _BACKUP)) if os.path.lexists(f) else None}
            for f in finals]
    with signals_deferred():  # Ctrl-C cannot split a commit
        _write_journal(journal, plan)
        try:
            for item in plan:
                if item["backup"] is not None:
                    os.replace(item["final"], item["backup"])
            for f in finals[1:] + finals[:1]:
                os.replace(temps[f], f)
        except BaseException:
            _undo(journal)  # puts the previous outputs back
            raise
        _undo(journal)  # marker in place: drops the backups and the journal


def _refuse_inputs(finals: Sequence[Path], inputs: Iterable[os.PathLike]) -> None:
    """An output that is one of the command's inputs (the same file, also through a symbolic
    link) is an error whatever ``--force`` says: the user asked to overwrite earlier outputs,
    not the data the command reads. Only outputs that exist can be inputs, so the inputs are
    looked at only then (a rerun with ``--force``), and only those named like an output or its
    link target: the rename replaces a directory entry, so an input under another name (a hard
    link, or a link to the output) keeps its contents; this spares a million stat calls."""
    existing = {}
    for f in finals:
        try:
            st = os.stat(f)
        except OSError:
            continue
        existing[(st.st_dev, st.st_ino)] = f
    if not existing:
        return
    names = {n for f in existing.values() for n in (f.name, os.path.basename(os.path.realpath(f)))}
    for i in inputs:
        if os.path.basename(i) not in names:
            continue
        try:
            st = os.stat(i)
        except OSError:
            continue
        f = existing.get((st.st_dev, st.st_ino))
        if f is not None:
            same = "" if os.path.abspath(i) == os.path.abspath(f) else f" (as {i})"
            raise ValueError(f"{f}: this output is also an input of the command{same}; "
                             f"choose another output path (--force does not overwrite inputs)")


@contextlib.contextmanager
def atomic_outputs(finals: Sequence[os.PathLike], overwrite: bool = False,
                   inputs: Iterable[os.PathLike] = ()) -> Iterator[Dict[Path, Path]]:
    """Yield {final path: temp path}; on normal exit move every temp file onto its final path
    (all or nothing, see the module docstring), on any exception delete them all, so a failed
    or killed build never leaves a partial output. The first path is the commit marker.

    Every writer goes through here, so here are its rules: an existing output is an error
    naming it unless ``overwrite`` (the CLIs' ``--force``), and an output that is one of
    ``inputs`` (the files the command reads) is an error even then."""
    finals = [Path(f) for f in finals]
    recover_outputs(finals)
    for f in finals:
        if f.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, not an output file", str(f))
    _refuse_inputs(finals, inputs)
    if not overwrite:
        existing = [str(f) for f in finals if os.path.lexists(f)]
        if existing:
            raise FileExistsError(f"output exists: {', '.join(existing)} (use --force to "
                                  f"overwrite)")
    temps: Dict[Path, Path] = {}
    try:
        for f in finals:
            try:
                f.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # an ancestor is a file
                raise NotADirectoryError(errno.ENOTDIR, "not a directory (a file is in the "
                                         "way)", str(f.parent)) from None
            temps[f] = tmp = temp_path(f, TEMP_SUFFIX)  # registered first: an interrupt may come
            os.close(create_new(tmp))
        yield temps
        _commit(temps)
    except OSError as e:
        # a full disk or quota is reported by write(), which names no file: name the outputs
        if e.filename is None and e.errno in _WRITE_ERRNOS:
            raise OSError(e.errno, e.strerror, ", ".join(map(str, finals))) from None
        raise
    finally:
        for tmp in temps.values():
            discard(tmp)
