"""Write outputs atomically: temp files in the destination directory, renamed on success."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Sequence

__all__ = ["atomic_outputs"]


@contextlib.contextmanager
def atomic_outputs(finals: Sequence[os.PathLike], overwrite: bool = False
                   ) -> Iterator[Dict[Path, Path]]:
    """Yield {final path: temp path}; on normal exit rename every temp file onto its final path,
    on any exception delete them all, so a failed build never leaves a partial output.

    Temp files live next to their final path so the rename stays on one filesystem (atomic).
    """
    finals = [Path(f) for f in finals]
    if not overwrite:
        existing = [str(f) for f in finals if f.exists()]
        if existing:
            raise FileExistsError(f"output exists: {', '.join(existing)} (use --force to "
                                  f"overwrite)")
    temps: Dict[Path, Path] = {}
    try:
        for f in finals:
            f.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".partial", dir=f.parent)
            os.close(fd)
            temps[f] = Path(tmp)
        yield temps
        mask = os.umask(0)
        os.umask(mask)
        for f, tmp in temps.items():
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; outputs are shared data
            os.replace(tmp, f)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
