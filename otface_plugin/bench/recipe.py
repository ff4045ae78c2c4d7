"""The recipe route: each run trains through a patched copy of arcface_torch's ``train_v2.py``.

``$ARCFACE_TORCH_DIR`` is never modified: it is copied once to ``<work>/arcface_torch`` and the
copy is patched with the plugin's installer. Per run, a python job config is written into the
copy's ``configs/`` (upstream backbone, the bench's ``train.rec``, batch ``P*K`` from the ``pk``
sampler for every loss, so all losses see the same data order per seed), trained with
``torchrun --nproc_per_node=1 train_v2.py`` in the training interpreter
(``$OTFACE_TRAIN_PYTHON``, default this one), and its ``model.pt`` is scored on the bench's
``.bin`` pairs in that interpreter. The stored result has the plugin route's layout
(``result.json`` with history and timing, ``scores.npy``), so metrics, report and plots are shared.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from otface_plugin.bench.spec import OTFACE_DEFAULTS, RunSpec, TrainConfig
from otface_plugin.bench.store import write_result
from otface_plugin.losses.components import PARTS, parse_components

ENV_UPSTREAM = "ARCFACE_TORCH_DIR"
ENV_TRAIN_PYTHON = "OTFACE_TRAIN_PYTHON"
ROUTES = ("auto", "plugin", "recipe")
DEFAULT_NETWORK = "mbf"
REPO = Path(__file__).resolve().parents[2]
# what train_v2.py imports beyond torch (the recipe's own requirements)
TRAIN_DEPS = "import mxnet, sklearn, scipy, tensorboard, easydict"

LOSS_LINE = re.compile(r"Training: (\S+ \S+)-.*?Loss ([-\d.naif]+)\s+LearningRate ([-\d.e]+)\s+"
                       r"Epoch: (\d+)\s+Global Step: (\d+)")


def resolve_route(route: str) -> str:
    """``auto``: the recipe when ``$ARCFACE_TORCH_DIR`` is set, else the plugin's loop."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "auto":
        return "recipe" if os.environ.get(ENV_UPSTREAM) else "plugin"
    return route


def train_python() -> str:
    return os.environ.get(ENV_TRAIN_PYTHON) or sys.executable


def missing_deps(python: Optional[str] = None) -> Optional[str]:
    """None when ``python`` can run train_v2.py, else the import error."""
    r = subprocess.run([python or train_python(), "-W", "ignore", "-c", TRAIN_DEPS],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def prepare_checkout(work: Path, upstream: Optional[str] = None) -> Path:
    """``<work>/arcface_torch``: a copy of ``$ARCFACE_TORCH_DIR`` patched by the installer (once)."""
    from otface_plugin.arcface_torch import installer

    src = upstream or os.environ.get(ENV_UPSTREAM)
    if not src or not Path(src, "train_v2.py").is_file():
        raise RuntimeError(f"the recipe route needs {ENV_UPSTREAM} set to an arcface_torch checkout "
                           f"(got {src!r})")
    root = work / "arcface_torch"
    if root.is_dir():
        try:
            if installer.check(root)[0] == installer.Status.INSTALLED:
                return root
        except Exception:  # noqa: BLE001 - a broken copy is rebuilt below
            pass
        shutil.rmtree(root)
    tmp = work / "arcface_torch.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    installer.copy_checkout(src, tmp)
    installer.install(tmp)
    os.replace(tmp, root)
    return root


def schedule(steps: int, warmup_fraction: float) -> Dict[str, int]:
    """num_image/num_epoch/warmup_epoch giving exactly ``steps`` steps (train_v2 counts
    ``num_image // batch * num_epoch``); 20 epochs when possible so the warm-up (whole epochs)
    is close to ``warmup_fraction``, else one epoch without warm-up."""
    epochs = 20 if steps % 20 == 0 else 1
    warm = int(round(warmup_fraction * epochs)) if epochs > 1 else 0
    return {"epochs": epochs, "steps_per_epoch": steps // epochs, "warmup_epoch": warm}


def job_config(spec: RunSpec, train: TrainConfig, rec_dir: Path, num_classes: int, output: Path,
               network: str = DEFAULT_NETWORK) -> Dict[str, Any]:
    """The keys of one run's job config (merged by train_v2.py over configs/base.py)."""
    sch = schedule(train.steps, train.warmup_fraction)
    cfg: Dict[str, Any] = {
        "network": network, "resume": False, "save_all_states": False, "output": str(output),
        "embedding_size": train.embedding_size, "sample_rate": 1.0, "fp16": False,
        "batch_size": train.batch_size, "optimizer": "sgd", "lr": train.lr,
        "momentum": train.momentum, "weight_decay": train.weight_decay,
        "verbose": 10 ** 9,  # no in-training verification: the bench scores the .bin afterwards
        "frequent": train.log_every, "dali": False, "gradient_acc": 1, "seed": spec.seed,
        "num_workers": 1, "rec": str(rec_dir), "num_classes": num_classes,
        "num_image": sch["steps_per_epoch"] * train.batch_size, "num_epoch": sch["epochs"],
        "warmup_epoch": sch["warmup_epoch"], "val_targets": [],
        "loss": spec.loss, "sampler": spec.sampler, "num_instances": train.K,
    }
    if spec.sampler == "hard":
        from otface_plugin.bench.data import HARD_REFRESH_STEPS

        cfg["hard"] = {"refresh_steps": HARD_REFRESH_STEPS}
    if spec.loss == "otface":
        # no "s": train_v2.py's margin softmax has its scale fixed at 64 (train.scale is not used)
        opts = {**OTFACE_DEFAULTS, "warmup_steps": max(1, train.steps // 10), **spec.options}
        cfg["otface"] = opts
    elif spec.options:
        raise ValueError(f"{spec.loss} takes no ablation options, got {spec.options}")
    return cfg


def render_config(cfg: Dict[str, Any]) -> str:
    lines = ["from easydict import EasyDict as edict", "", "config = edict()"]
    lines += [f"config.{k} = {v!r}" for k, v in cfg.items()]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int) -> Dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(max(1, threads)),
            "PYTHONWARNINGS": "ignore"}


def parse_log(text: str, is_ot: bool) -> Dict[str, Any]:
    """History (as the plugin route stores it) and ms/step from the log's timestamps."""
    history: Dict[str, List[float]] = {"step": [], "loss": []}
    stamps = []
    for m in LOSS_LINE.finditer(text):
        history["step"].append(int(m.group(5)))
        history["loss"].append(float(m.group(2)))
        stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    if is_ot:
        rows = parse_components(text)
        for k in PARTS:
            history[k] = [rows[s][k] if s in rows else float("nan") for s in history["step"]]
    per_step = [1000 * (t1 - t0) / (s1 - s0) for t0, t1, s0, s1 in
                zip(stamps, stamps[1:], history["step"], history["step"][1:]) if s1 > s0]
    return {"history": history, "ms_per_step": per_step}


SCORE_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from backbones import get_model
from otface_plugin.bench.data import load_bin
from otface_plugin.bench.scores import pair_scores
net = get_model({network!r}, dropout=0.0, fp16=False, num_features={emb})
net.load_state_dict(torch.load({pt!r}, map_location="cpu"))
images, pairs, _ = load_bin(__import__("pathlib").Path({bin!r}))
np.save({out!r}, pair_scores(net, images, pairs))
"""


def run_recipe(root: Path, spec: RunSpec, train: TrainConfig, rec_dir: Path, bin_path: Path,
               num_classes: int, run_dir: Path, key: str, network: str = DEFAULT_NETWORK,
               threads: int = 0, python: Optional[str] = None, timeout: float = 24 * 3600
               ) -> Dict[str, float]:
    """Train one run through train_v2.py, score it and store it like the plugin route."""
    python = python or train_python()
    threads = threads or (os.cpu_count() or 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    output = run_dir / "recipe_out"
    shutil.rmtree(output, ignore_errors=True)  # an interrupted run starts over
    name = "bench_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{spec.name}_{key}")
    cfg = job_config(spec, train, rec_dir, num_classes, output, network)
    (root / "configs" / f"{name}.py").write_text(render_config(cfg))
    (run_dir / "job_config.py").write_text(render_config(cfg))
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           "train_v2.py", f"configs/{name}.py"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    (run_dir / "torchrun.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{spec.name}: {' '.join(cmd)} failed (exit {r.returncode}) in {root}:\n"
                           f"{(r.stdout + r.stderr)[-4000:]}")
    parsed = parse_log((output / "training.log").read_text(), spec.loss == "otface")
    history = parsed["history"]
    if not history["loss"] or not all(np.isfinite(history["loss"])):
        raise FloatingPointError(f"{spec.name}: no finite losses in {output / 'training.log'}")
    t1 = time.perf_counter()
    script = SCORE_SCRIPT.format(root=str(root), threads=threads, network=network,
                                 emb=train.embedding_size, pt=str(output / "model.pt"),
                                 bin=str(bin_path), out=str(run_dir / "scores.tmp.npy"))
    s = subprocess.run([python, "-c", script], cwd=root, env=_env(threads), capture_output=True,
                       text=True, timeout=timeout)
    if s.returncode != 0:
        raise RuntimeError(f"{spec.name}: scoring model.pt failed:\n{(s.stdout + s.stderr)[-4000:]}")
    os.replace(run_dir / "scores.tmp.npy", run_dir / "scores.npy")
    per_step = np.asarray(parsed["ms_per_step"] or [1000 * wall / max(1, train.steps)])
    timing = {"train_seconds": wall, "ms_per_step_mean": float(per_step.mean()),
              "ms_per_step_median": float(np.median(per_step)),
              "eval_seconds": time.perf_counter() - t1, "threads": threads}
    write_result(run_dir, key, spec, history, timing, route="recipe", network=network)
    (root / "configs" / f"{name}.py").unlink(missing_ok=True)
    return timing


class RecipeRoute:
    """Runs one after another through train_v2.py of ``<work>/arcface_torch`` (patched once)."""

    def __init__(self, work: Path, rec_dir: Path, bin_path: Path, num_classes: int, train: TrainConfig,
                 network: str = DEFAULT_NETWORK, log=print) -> None:
        self.work, self.rec_dir, self.bin_path, self.num_classes = work, rec_dir, bin_path, num_classes
        self.train_cfg, self.network, self.log = train, network, log

    def train(self, todo: List[RunSpec], keys: Dict[str, str], runs_dir: Path, bar: Any, done) -> None:
        root = prepare_checkout(self.work)
        self.log(f"      recipe: train_v2.py of {root} (patched copy), {self.network}, python {train_python()}")
        for spec in todo:
            bar.set_postfix_str(spec.name)
            timing = run_recipe(root, spec, self.train_cfg, self.rec_dir, self.bin_path, self.num_classes,
                                runs_dir / spec.name, keys[spec.name], self.network, self.train_cfg.threads)
            bar.update(self.train_cfg.steps)
            done(spec, timing)

