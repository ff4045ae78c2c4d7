"""How a study trains its runs: the route interface.

A route trains each run it is given into ``runs_dir/<run name>`` in the layout of
:mod:`otface_plugin.bench.store`; the study then reads every run back the same way, whatever
the route, so metrics, report and plots never depend on it. This module knows no route:
the routes import it, and :func:`otface_plugin.bench.study.make_route` picks one, so no module
imports its own importer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Protocol

from otface_plugin.bench.spec import RunSpec

__all__ = ["Route", "RunDone"]

# called with a finished run and its timings (ms_per_step_median, train_seconds, ...)
RunDone = Callable[[RunSpec, Dict[str, float]], None]


class Route(Protocol):
    def train(self, todo: List[RunSpec], keys: Dict[str, str], runs_dir: Path, bar: Any,
              done: RunDone) -> None:
        """Train and store every run of ``todo`` (``keys``: each run's configuration key);
        advance the progress ``bar`` by training steps."""

