"""SIGTERM handled as Ctrl-C by the command-line tools.

``kill``, a job scheduler's stop or a container's shutdown send SIGTERM, whose default action
ends the process at once: the data builders' temp files would stay behind and ``otface-bench``'s
worker processes would go on training as orphans. Raising KeyboardInterrupt instead unwinds
through the same cleanup as Ctrl-C (temp files removed, workers terminated, finished work kept).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["sigterm_as_interrupt", "signals_deferred"]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only: elsewhere Python
    cannot install handlers, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM wait; they are delivered when it ends.

    For a short step that must finish once begun (the installer's writes, a data builder's commit): a signal then lands
    before or after it, never inside, so what the tool says about an interrupt is known to be
    true. SIGKILL still ends the process anywhere. Where signal masks do not exist (Windows) or
    off the main thread, the block runs unchanged."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
