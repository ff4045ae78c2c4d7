"""Run a command with its standard output broken the two ways a shell breaks it: a reader that
closed the pipe before the first write (``| true``, ``| head -0``) and a full disk
(``> /dev/full``). ``check_report`` asserts what ``otface_plugin.cli_output`` promises."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

from otface_plugin.cli_output import EXIT_OUTPUT_LOST

FAULTS = ("closed-pipe", "full-disk")


def run_with_stdout(fault: str, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    if fault == "closed-pipe":
        read, write = os.pipe()
        os.close(read)  # closed before the child starts: its first write meets EPIPE, every time
        try:
            return subprocess.run(list(cmd), stdout=write, stderr=subprocess.PIPE, text=True, **kwargs)
        finally:
            os.close(write)
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        return subprocess.run(list(cmd), stdout=full, stderr=subprocess.PIPE, text=True, **kwargs)


def lost_output_lines(stderr: str, prog: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: could not write to standard output")]


def check_report(fault: str, r: subprocess.CompletedProcess, prog: str, rc: int, did: str = "",
                 writes: bool = True) -> None:
    """The tool whose own exit status is ``rc`` (its work done, ``did`` its outcome line when it
    succeeded) kept that status for a closed pipe and said nothing; with a full disk it said,
    in one line, that its output is incomplete and what it did, with 74 instead of 0 (nothing,
    when ``writes`` is False: it had nothing for stdout)."""
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]
    lines = lost_output_lines(r.stderr, prog)
    if fault == "closed-pipe" or not writes:
        assert r.returncode == rc and lines == [], r.stderr[-2000:]
        return
    assert r.returncode == (EXIT_OUTPUT_LOST if rc == 0 else rc), r.stderr[-2000:]
    expected = f"{prog}: could not write to standard output (No space left on device); the output is incomplete"
    if rc == 0:
        expected += "; the command itself succeeded" + (f": {did}" if did else "")
    assert lines == [expected], r.stderr[-2000:]
