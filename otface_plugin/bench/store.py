"""Finished runs on disk: ``<runs>/<name>/`` holds ``scores.npy`` (the test pairs' cosine
similarities), optionally ``model.pt``, and ``result.json`` written last, which marks the run
finished and carries its configuration key, so a changed setting never reuses a stale run."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from otface_plugin.atomicfile import atomic_file, atomic_write
from otface_plugin.bench.spec import RunSpec

__all__ = ["save_run", "load_run", "write_result"]


def save_run(run_dir: Path, key: str, spec: RunSpec, net: torch.nn.Module, history: dict,
             timing: dict, scores: np.ndarray) -> dict:
    """Store a finished run; ``result.json`` is written last and marks it finished."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / "model.pt") as f:
        torch.save(net.state_dict(), f)
    with atomic_file(run_dir / "scores.npy") as f:
        np.save(f, scores)
    return write_result(run_dir, key, spec, history, timing)


def write_result(run_dir: Path, key: str, spec: RunSpec, history: dict, timing: dict,
                 **extra: Any) -> Dict[str, Any]:
    """``result.json``, last: the run is finished once it exists (``extra``: route fields)."""
    result = {"key": key, "spec": asdict(spec), **extra, "history": history, "timing": timing}
    atomic_write(run_dir / "result.json", json.dumps(result))
    return result


def load_run(run_dir: Path, key: str) -> Optional[Tuple[dict, np.ndarray]]:
    """A finished run with the same configuration key, or None."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
        if result.get("key") != key:
            return None
        return result, np.load(run_dir / "scores.npy")
    except (OSError, ValueError):
        return None
