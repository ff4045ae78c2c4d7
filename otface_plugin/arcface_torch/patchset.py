"""Read and apply the plugin's unified diffs in pure Python (no `patch` or `git` needed).

The patches live in the package ``otface_plugin.patches`` (the repository's ``patches/``), so an
installed wheel can patch a checkout. Hunks are applied strictly: each hunk's old lines must be
at the recorded position (shifted only by the hunks before it). That is enough because the
installer applies them only to files whose git blob id matched the pinned upstream version.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from otface_plugin.arcface_torch.shipped import shipped_dir

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A patch does not apply (the file is not the version the patch was made against)."""


def git_blob_id(data: bytes) -> str:
    """The id `git hash-object` gives a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Hunk:
    old_start: int  # 1-based line in the old file, as in the @@ line
    new_start: int  # 1-based line in the new file
    old: List[str]  # lines with their endings
    new: List[str]


@dataclass
class FilePatch:
    path: str  # relative to the arcface_torch directory, "/" separated
    hunks: List[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    name: str
    header: str  # the leading "# ..." comment
    files: List[FilePatch]


def parse_patch(name: str, text: str) -> Patch:
    """Parse a unified diff whose file names are ``a/PATH`` and ``b/PATH``."""
    lines = text.splitlines(keepends=True)
    header: List[str] = []
    files: List[FilePatch] = []
    i = 0
    while i < len(lines) and not lines[i].startswith("--- "):
        header.append(lines[i])
        i += 1
    while i < len(lines):
        line = lines[i]
        if not line.startswith("--- "):
            raise PatchError(f"{name}: line {i + 1}: expected '--- a/PATH', got {line!r}")
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"{name}: line {i + 2}: expected '+++ b/PATH'")
        path = _strip_prefix(lines[i + 1][4:].rstrip("\n").split("\t")[0], "b/")
        fp = FilePatch(path)
        files.append(fp)
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            m = _HUNK_RE.match(lines[i])
            if not m:
                raise PatchError(f"{name}: line {i + 1}: bad hunk header {lines[i]!r}")
            old_len = int(m.group(2) or 1)
            new_len = int(m.group(4) or 1)
            hunk = Hunk(int(m.group(1)), int(m.group(3)), [], [])
            i += 1
            while (len(hunk.old) < old_len or len(hunk.new) < new_len) and i < len(lines):
                tag, body = lines[i][:1], lines[i][1:]
                if tag == " ":
                    hunk.old.append(body)
                    hunk.new.append(body)
                elif tag == "-":
                    hunk.old.append(body)
                elif tag == "+":
                    hunk.new.append(body)
                else:
                    raise PatchError(f"{name}: line {i + 1}: unexpected {lines[i]!r} in a hunk")
                i += 1
                if i < len(lines) and lines[i].startswith("\\ No newline at end of file"):
                    _drop_newline(hunk, tag)
                    i += 1
            if len(hunk.old) != old_len or len(hunk.new) != new_len:
                raise PatchError(f"{name}: truncated hunk for {path}")
            fp.hunks.append(hunk)
    if not files:
        raise PatchError(f"{name}: no file diffs found")
    return Patch(name, "".join(header), files)


def _strip_prefix(path: str, prefix: str) -> str:
    return path[len(prefix):] if path.startswith(prefix) else path


def _drop_newline(hunk: Hunk, tag: str) -> None:
    # "\ No newline at end of file" applies to the line just read, on the side(s) it belongs to
    if tag in (" ", "-"):
        hunk.old[-1] = hunk.old[-1].rstrip("\n")
    if tag in (" ", "+"):
        hunk.new[-1] = hunk.new[-1].rstrip("\n")


def apply_file_patch(fp: FilePatch, data: bytes, reverse: bool = False) -> bytes:
    """Apply (or un-apply) one file's hunks to its bytes; PatchError when a hunk does not match."""
    lines = data.decode("utf-8").splitlines(keepends=True)
    out: List[str] = []
    pos = 0  # index into `lines` of the first line not yet copied
    for n, hunk in enumerate(fp.hunks, 1):
        # the input is the old file (apply) or the new file (un-apply): match that side
        old, new, first = (hunk.new, hunk.old, hunk.new_start) if reverse else (hunk.old, hunk.new, hunk.old_start)
        start = first if not old else first - 1  # an empty side's @@ -N,0 means "after line N"
        if start < pos or lines[start:start + len(old)] != old:
            raise PatchError(f"{fp.path}: hunk {n} does not match at line {start + 1}")
        out.extend(lines[pos:start])
        out.extend(new)
        pos = start + len(old)
    out.extend(lines[pos:])
    return "".join(out).encode("utf-8")


def load_patches(names: Optional[Sequence[str]] = None) -> List[Patch]:
    """The shipped patches in application order (file name order), or the ones named."""
    root = shipped_dir("patches")
    available = sorted(p.name for p in root.iterdir() if p.name.endswith(".patch"))
    if names is not None:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise PatchError(f"unknown patch(es) {unknown}; shipped: {available}")
        available = [n for n in available if n in names]
    return [parse_patch(n, root.joinpath(n).read_text(encoding="utf-8")) for n in available]


def patches_by_file(patches: Sequence[Patch]) -> Dict[str, List[Tuple[str, FilePatch]]]:
    """path -> [(patch name, its diff of that file)] in application order."""
    result: Dict[str, List[Tuple[str, FilePatch]]] = {}
    for patch in patches:
        for fp in patch.files:
            result.setdefault(fp.path, []).append((patch.name, fp))
    return result


def apply_all(per_file: Sequence[Tuple[str, FilePatch]], data: bytes, reverse: bool = False) -> bytes:
    """Apply one file's diffs from every patch in order (or undo them in reverse order)."""
    steps = list(reversed(per_file)) if reverse else list(per_file)
    for name, fp in steps:
        try:
            data = apply_file_patch(fp, data, reverse=reverse)
        except PatchError as exc:
            raise PatchError(f"{name}: {exc}") from None
    return data
