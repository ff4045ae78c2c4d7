"""How a study trains its runs: the route interface, and the route of a study config.

A route trains each run it is given into ``runs_dir/<run name>`` in the layout of
:mod:`otface_plugin.bench.store`; the study then reads every run back the same way, whatever
the route, so metrics, report and plots never depend on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Protocol

from otface_plugin.bench.spec import RunSpec

if TYPE_CHECKING:
    from otface_plugin.bench.data import Prepared
    from otface_plugin.bench.study import StudyConfig

__all__ = ["Route", "RunDone", "make_route"]

# called with a finished run and its timings (ms_per_step_median, train_seconds, ...)
RunDone = Callable[[RunSpec, Dict[str, float]], None]


class Route(Protocol):
    def train(self, todo: List[RunSpec], keys: Dict[str, str], runs_dir: Path, bar: Any,
              done: RunDone) -> None:
        """Train and store every run of ``todo`` (``keys``: each run's configuration key);
        advance the progress ``bar`` by training steps."""


def make_route(cfg: "StudyConfig", prep: "Prepared", num_classes: int, log: Callable[[str], None]) -> Route:
    """``plugin``: the plugin's own loop in worker processes; ``recipe``: train_v2.py of a patched
    copy of the upstream checkout."""
    if cfg.route == "plugin":
        from otface_plugin.bench.plugin_route import PluginRoute

        return PluginRoute(prep.rec_dir, prep.bin_path, cfg.train, cfg.jobs)
    if cfg.route == "recipe":
        from otface_plugin.bench.recipe import RecipeRoute

        return RecipeRoute(cfg.work_dir, prep.rec_dir, prep.bin_path, num_classes, cfg.train, cfg.network, log)
    raise ValueError(f"unknown route {cfg.route!r}: 'plugin' or 'recipe'")
