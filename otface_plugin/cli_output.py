"""The one rule every command-line tool of the package follows when its standard output fails.

A tool's work (patching a checkout, writing a dataset, training) never depends on whether its
report can be written: a write to stdout that fails neither stops the work nor turns into an
error message about the work, so nothing the tool says afterwards can contradict what it did.

- The reader closed the pipe early (``| head``, ``| true``): not an error. The rest of the
  output is dropped silently and the exit status is the tool's own.
- Any other failure (``> /dev/full``, an I/O error, stdout closed with ``>&-``): the rest of the
  output is dropped, the work goes on, and at the end one line on stderr says the output is
  incomplete and what the tool did. A tool that succeeded then exits with
  :data:`EXIT_OUTPUT_LOST` (sysexits' EX_IOERR) instead of 0; a tool that failed keeps its own
  status, whose message is already on stderr.

Text the stdout encoding cannot represent (a path with undecodable bytes under a UTF-8 locale)
is written with backslash escapes instead of failing.
"""
from __future__ import annotations

import errno
import io
import os
import sys
from typing import Callable, Optional

__all__ = ["EXIT_OUTPUT_LOST", "run_cli", "outcome"]

EXIT_OUTPUT_LOST = 74

_current: Optional["_GuardedStdout"] = None


class _GuardedStdout:
    """Stands in for ``sys.stdout``: writes go through until the first OSError, then nowhere."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.error: Optional[OSError] = None
        self.outcome: Optional[str] = None
        if stream is None:  # started with fd 1 closed: Python then makes print() a silent no-op
            self.error = OSError(errno.EBADF, os.strerror(errno.EBADF))

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:
                    enc = getattr(self._stream, "encoding", None) or "utf-8"
                    self._stream.write(text.encode(enc, "backslashreplace").decode(enc))
            except OSError as exc:
                self._fail(exc)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        # What failed is still in the stream's buffer; the interpreter flushes it again at exit
        # and would print "Exception ignored ... BrokenPipeError". Aim fd 1 at /dev/null so that
        # flush (and any child process sharing fd 1) succeeds quietly.
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def outcome(statement: str) -> None:
    """Record what the running tool has done, in one line ("installed X in DIR"); it is repeated
    on stderr if stdout fails, so the user learns it even when the report is lost."""
    if _current is not None:
        _current.outcome = statement


def run_cli(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run a tool's ``main`` body under the rule above; returns its exit status.

    ``SystemExit`` (argparse, ``--help``) passes through, with its status changed only where
    the rule says (a successful exit whose output was lost)."""
    global _current
    real = sys.stdout
    guard = _GuardedStdout(real)
    outer, _current = _current, guard
    sys.stdout = guard
    try:
        try:
            rc = body() or 0
        except SystemExit as exc:
            code = exc.code
            if code in (None, 0) and _finish(prog, guard, 0):
                raise SystemExit(EXIT_OUTPUT_LOST) from None
            raise
        return _finish(prog, guard, rc)
    finally:
        sys.stdout = real
        _current = outer


def _finish(prog: str, guard: _GuardedStdout, rc: int) -> int:
    guard.flush()
    exc = guard.error
    if exc is None or exc.errno == errno.EPIPE:
        return rc
    reason = exc.strerror or str(exc)
    msg = f"{prog}: could not write to standard output ({reason}); the output is incomplete"
    if rc == 0:
        msg += f"; the command itself succeeded{': ' + guard.outcome if guard.outcome else ''}"
    print(msg, file=sys.stderr)
    return EXIT_OUTPUT_LOST if rc == 0 else rc
