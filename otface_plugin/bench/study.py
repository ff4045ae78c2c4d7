"""The study: plan the runs, run (or reuse) each, and collect every number.

Runs are keyed by a hash of everything that changes their outcome (data, training config,
loss, seed, options); a finished run with the same key is loaded instead of repeated, so an
interrupted study resumes where it stopped and a changed setting reruns only what it affects.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from otface_plugin.bench import metrics as M
from otface_plugin.bench.data import SAMPLERS, Prepared, load_prepared, prepare
from otface_plugin.bench.route import Route
from otface_plugin.bench.spec import LOSSES, OTFACE_DEFAULTS, RunSpec, TrainConfig
from otface_plugin.bench.store import load_run
from otface_plugin.losses.otface import OTFaceLoss

AUTO_SHARE = inspect.signature(OTFaceLoss.__init__).parameters["grad_share"].default
# One change at a time against the defaults (lambda 0.1, eps 0.05, conv, hard).
ABLATION_GRID: Dict[str, Dict[str, Any]] = {
    # a size control: the OT term at 1% of the default's, so about 0.002% of the gradient; a gain
    # over ArcFace that survives this comes from perturbing the trajectory, not from the term's pull
    "lambda=0.001": {"lambda_ot": 0.001},
    "lambda=0.03": {"lambda_ot": 0.03},
    "lambda=0.3": {"lambda_ot": 0.3},
    "lambda=1.0": {"lambda_ot": 1.0},
    "lambda=3.0": {"lambda_ot": 3.0},
    # lambda adapted to the target share of the gradient at the features; the target
    # is named in the options, so the run key changes with it
    "lambda=auto": {"lambda_ot": "auto", "grad_share": AUTO_SHARE},
    "share=0.1": {"lambda_ot": "auto", "grad_share": 0.1},
    "share=0.3": {"lambda_ot": "auto", "grad_share": 0.3},
    "share=1.0": {"lambda_ot": "auto", "grad_share": 1.0},
    "eps=0.02": {"eps": 0.02},
    "eps=0.2": {"eps": 0.2},
    "feature=embedding": {"feature": "embedding"},
    "triplets=all": {"triplet_mode": "all"},
    "triplets=misclassified": {"triplet_mode": "misclassified"},
}
TOY_ABLATION = ("lambda=0.3", "feature=embedding")
FARS = (1e-2, 1e-3)
ROUTE_LINES = {
    "plugin": "plugin minimal loop (otface_plugin.bench.train), not the recipe's train_v2.py",
    "recipe": "recipe: patched copy of {upstream} trained with torchrun train_v2.py "
              "(network {network}, sampler {sampler}, margin scale 64), not the plugin's minimal loop",
}
HARD_FRACTION = 0.1


@dataclass
class StudyConfig:
    """A whole study: data, seeds, losses, training budget and the ablation switch."""

    dataset: str
    out: str = "results"
    work: str = ""  # default: <out>/_work
    test_identities: int = 20
    pairs: int = 6000
    split_seed: int = 0
    max_identities: int = 0  # 0: all identity folders
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    losses: Tuple[str, ...] = LOSSES
    ablation: bool = True
    ablation_variants: Tuple[str, ...] = tuple(ABLATION_GRID)
    ablation_seeds: int = 1  # the ablation variants run at the first N seeds (paired with the main runs)
    ablation_seed_counts: Tuple[Tuple[str, int], ...] = ()  # (variant, N) where a variant runs at other N
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: int = 2
    jobs: int = 2  # runs trained in parallel, one process each
    toy: bool = False
    route: str = "plugin"  # "plugin" (own minimal loop) or "recipe" (patched train_v2.py); cli resolves "auto"
    network: str = "mbf"  # upstream backbone of the recipe route
    protocol: str = "split"  # "split": random identity-disjoint split; "lfw": LFW's people/pairs files
    lfw_train_sets: str = "1-5"  # people.txt sets to train on (1-based); the other sets' folds test
    lfw_max_test_folds: int = 0  # lfw: only the first N test folds (0: every fold not in lfw_train_sets)
    max_train_identities: int = 0  # lfw: a seeded subset of the training people (0: all)
    sampler: str = "pk"  # batches of the main runs and the ablation
    compare_sampler: Tuple[str, ...] = ()  # losses also trained with the other sampler, same seeds

    @property
    def other_sampler(self) -> str:
        return next(s for s in SAMPLERS if s != self.sampler)

    @property
    def runs_dir(self) -> Path:
        return self.work_dir / ("runs" if self.route == "plugin" else f"runs_{self.route}")

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(self.out) / "_work"


def toy_config(dataset: str, out: str) -> StudyConfig:
    """Minutes-sized pipeline check: 12 identities, 1 seed, 30 steps, tiny net, 2 ablations."""
    return StudyConfig(dataset=dataset, out=out, test_identities=8, pairs=480, max_identities=12,
                       seeds=(0,), ablation_variants=TOY_ABLATION, toy=True,
                       train=TrainConfig(steps=30, P=4, K=4, widths=(8, 8, 16, 16),
                                         embedding_size=32, log_every=5))


# Projected from 30 timed steps (docs/evidence.md): 9 runs x 2000 steps fit 90 min on 2 cores.
LFW_STEPS = 2000


def lfw_config(dataset: str, out: str, toy: bool = False) -> StudyConfig:
    """The LFW protocol study. Full: 801 training people (sets 1-5, >= 2 images), the 3000 pairs
    of folds 6-10, 3 losses x 3 seeds, P x K = 16 x 4; toy: 48 training people, the first 2 test folds, one
    seed, 30 steps of a tiny net (a pipeline check of about a minute)."""
    if toy:
        return StudyConfig(dataset=dataset, out=out, protocol="lfw", lfw_max_test_folds=2,
                           max_train_identities=48, seeds=(0,), ablation=False, toy=True,
                           train=TrainConfig(steps=30, P=4, K=4, widths=(8, 8, 16, 16),
                                             embedding_size=32, log_every=5))
    return StudyConfig(dataset=dataset, out=out, protocol="lfw", seeds=(0, 1, 2), ablation=False,
                       train=TrainConfig(steps=LFW_STEPS, P=16, K=4, log_every=10))


def plan_runs(cfg: StudyConfig) -> List[RunSpec]:
    """Every loss x seed, the OTFace ablation variants at the first ``ablation_seeds`` seeds, then
    the sampler comparison's runs (the ``compare_sampler`` losses x seeds with the other sampler)."""
    runs = [RunSpec(loss, seed, sampler=cfg.sampler) for seed in cfg.seeds for loss in cfg.losses]
    if cfg.ablation and "otface" in cfg.losses:
        runs += [RunSpec("otface", seed, v, ABLATION_GRID[v], cfg.sampler)
                 for v in cfg.ablation_variants for seed in ablation_seed_list(cfg, v)]
    runs += [RunSpec(loss, seed, sampler=cfg.other_sampler) for seed in cfg.seeds for loss in cfg.compare_sampler]
    return runs


def ablation_seed_list(cfg: StudyConfig, variant: Optional[str] = None) -> List[int]:
    """The seeds an ablation variant runs at (``variant`` None: the study's ablation seeds)."""
    n = dict(cfg.ablation_seed_counts).get(variant, cfg.ablation_seeds)
    return list(cfg.seeds[:max(1, n)])


def run_key(cfg: StudyConfig, prep: Prepared, spec: RunSpec) -> str:
    train = asdict(cfg.train)
    train.pop("threads")  # how a run is computed, not what it computes
    blob = json.dumps({"train": train, "spec": asdict(spec), "split": prep.train_ids,
                       "test": prep.test_ids, "pairs": prep.pairs, "split_seed": cfg.split_seed,
                       "defaults": OTFACE_DEFAULTS, "protocol": cfg.protocol, "route": cfg.route,
                       # only the recipe route trains an upstream backbone
                       **({"network": cfg.network} if cfg.route == "recipe" else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                smoothing=0.05)


def make_route(cfg: "StudyConfig", prep: Prepared, num_classes: int, log: Callable[[str], None]) -> Route:
    """``plugin``: the plugin's own loop in worker processes; ``recipe``: train_v2.py of a patched
    copy of the upstream checkout. Imported here, on use, so a plugin-route study never imports
    the recipe route's subprocess machinery."""
    if cfg.route == "plugin":
        from otface_plugin.bench.plugin_route import PluginRoute

        return PluginRoute(prep.rec_dir, prep.bin_path, cfg.train, cfg.jobs)
    if cfg.route == "recipe":
        from otface_plugin.bench.recipe import RecipeRoute

        return RecipeRoute(cfg.work_dir, prep.rec_dir, prep.bin_path, num_classes, cfg.train, cfg.network, log)
    raise ValueError(f"unknown route {cfg.route!r}: 'plugin' or 'recipe'")


def run_study(cfg: StudyConfig, progress: bool = True, log=print
              ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], np.ndarray]:
    """Prepare the data, train/evaluate every planned run (reusing finished ones), collect.

    Returns the results (JSON-able), the pair scores of every run and the pairs' labels.
    """
    t_start = time.perf_counter()
    work = cfg.work_dir
    if cfg.protocol == "lfw":
        from otface_plugin.bench.lfw import prepare_lfw

        log(f"[1/3] data: LFW protocol (people.txt sets / pairs.txt folds), .rec/.bin in {work / 'data'}")
        prep = prepare_lfw(Path(cfg.dataset), work / "data", cfg.lfw_train_sets, cfg.lfw_max_test_folds,
                           max_train_identities=cfg.max_train_identities, seed=cfg.split_seed,
                           workers=cfg.workers, progress=progress)
        log(f"      {prep.description}")
    else:
        log(f"[1/3] data: identity-disjoint split and .rec/.bin in {work / 'data'}")
        prep = prepare(Path(cfg.dataset), work / "data", cfg.test_identities, cfg.pairs, cfg.split_seed,
                       workers=cfg.workers, max_identities=cfg.max_identities or None, progress=progress)
    train, (_, _, issame) = load_prepared(prep.rec_dir, prep.bin_path)
    log(f"      {len(prep.train_ids)} train identities ({len(train.images)} images), "
        f"{len(prep.test_ids)} test identities: {len(issame)} pairs in {prep.folds} folds")
    for note in prep.notes:
        log(f"      note: {note}")

    specs = plan_runs(cfg)
    keys = {s.name: run_key(cfg, prep, s) for s in specs}
    runs_dir = cfg.runs_dir
    todo = [s for s in specs if load_run(runs_dir / s.name, keys[s.name]) is None]
    log(f"[2/3] runs ({cfg.route} route): {len(specs)} planned, {len(specs) - len(todo)} already finished, "
        f"{len(todo)} to train ({cfg.train.steps} steps each)")
    bar = _bar(len(todo) * cfg.train.steps, "training", progress)

    def done(spec: RunSpec, timing: Dict[str, float]) -> None:
        if not progress:  # the bar shows progress otherwise
            log(f"      {spec.name}: {timing['ms_per_step_median']:.0f} ms/step")

    if todo:
        make_route(cfg, prep, train.num_classes, log).train(todo, keys, runs_dir, bar, done)
    bar.close()

    log("[3/3] metrics")
    loaded = {s.name: load_run(runs_dir / s.name, keys[s.name]) for s in specs}
    results = collect(cfg, prep, specs, loaded, issame)
    results["meta"]["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    results["meta"]["runs_trained_this_invocation"] = len(todo)
    return results, {name: r[1] for name, r in loaded.items()}, issame


def collect(cfg: StudyConfig, prep: Prepared, specs: List[RunSpec],
            loaded: Dict[str, Tuple[dict, np.ndarray]], issame: np.ndarray) -> Dict[str, Any]:
    """All numbers: per run, per loss (mean/std over seeds), paired deltas, ablation."""
    def main_run(loss: str, seed: int, sampler: str = cfg.sampler) -> str:
        return RunSpec(loss, seed, sampler=sampler).name

    def arc_scores(seed: int) -> Optional[np.ndarray]:
        r = loaded.get(main_run("arcface", seed))
        return None if r is None else r[1]

    seeds = list(cfg.seeds)
    runs: Dict[str, Dict[str, Any]] = {}
    for spec in specs:
        result, scores = loaded[spec.name]
        ev = M.evaluate(scores, issame, prep.folds, FARS)
        correct = ev.pop("correct")
        row: Dict[str, Any] = {"loss": spec.loss, "seed": spec.seed, "variant": spec.variant,
                               "options": spec.options, "sampler": spec.sampler,
                               # a main run: in the loss tables (not an ablation or sampler-comparison run)
                               "main": spec.variant == "default" and spec.sampler == cfg.sampler, **ev}
        # Hard pairs under the ArcFace model. Same seed: the selection favours every model
        # but that ArcFace one (its errors define the set). Other seed: an independent ArcFace
        # selects, so all three losses of this seed are judged on equal terms.
        same = arc_scores(spec.seed)
        if same is not None:
            row["hard_accuracy_same_seed"] = float(correct[M.hard_pairs(same, issame, HARD_FRACTION)].mean())
        if len(seeds) > 1:
            other = arc_scores(seeds[(seeds.index(spec.seed) + 1) % len(seeds)])
            if other is not None:
                row["hard_accuracy_other_seed"] = float(correct[M.hard_pairs(other, issame, HARD_FRACTION)].mean())
        row.update({k: float(v) for k, v in result["timing"].items()})
        h = result["history"]
        row["final_loss"] = float(np.mean(h["loss"][-3:]))
        row["history"] = h
        runs[spec.name] = row

    metric_names = ["accuracy", *[f"tar@far={f:g}" for f in FARS], "hard_accuracy_other_seed",
                    "hard_accuracy_same_seed", "ms_per_step_median", "ms_per_step_mean"]
    main = [r for r in runs.values() if r["main"]]
    summary: Dict[str, Dict[str, Any]] = {}
    for loss in cfg.losses:
        rows = [r for r in main if r["loss"] == loss]
        summary[loss] = {m: M.mean_std([r[m] for r in rows]) for m in metric_names
                         if rows and all(m in r for r in rows)}
    # Paired by seed: same init, same batches, so the per-seed difference removes most noise.
    def paired_by_seed(a: List[str], b: List[str]) -> Dict[str, Any]:
        out = {}
        for m in ("accuracy", *[f"tar@far={f:g}" for f in FARS], "hard_accuracy_other_seed"):
            d = [runs[x][m] - runs[y][m] for x, y in zip(a, b) if m in runs[x] and m in runs[y]]
            if d:
                out[m] = {**M.mean_std(d), "wins": int(sum(x > 0 for x in d)), "ties": int(sum(x == 0 for x in d))}
        return out

    paired: Dict[str, Dict[str, Any]] = {}
    for loss in cfg.losses:
        if loss != "arcface" and "arcface" in cfg.losses:
            paired[f"{loss}-arcface"] = paired_by_seed([main_run(loss, s) for s in seeds],
                                                       [main_run("arcface", s) for s in seeds])
    # Same init and seed, other batch plan: the per-seed difference is the sampler's effect.
    sampler_comparison: Dict[str, Dict[str, Any]] = {}
    for loss in cfg.compare_sampler:
        other = [main_run(loss, s, cfg.other_sampler) for s in seeds]
        sampler_comparison[loss] = {
            "sampler": cfg.other_sampler, "baseline": cfg.sampler, "runs": other,
            "summary": {m: M.mean_std([runs[n][m] for n in other]) for m in metric_names
                        if all(m in runs[n] for n in other)},
            "paired": paired_by_seed(other, [main_run(loss, s) for s in seeds])}
    ot_activity = {name: ot_term_activity(r["history"]) for name, r in runs.items() if r["loss"] == "otface"}
    ablation = {}
    if cfg.ablation and "otface" in cfg.losses:
        abl_seeds = ablation_seed_list(cfg)
        default_runs = [main_run("otface", s) for s in abl_seeds]
        ablation["default"] = {"options": dict(OTFACE_DEFAULTS), "run": default_runs[0], "runs": default_runs,
                               "seeds": abl_seeds}
        for v in cfg.ablation_variants:
            vs = ablation_seed_list(cfg, v)
            names = [RunSpec("otface", s, v, ABLATION_GRID[v], cfg.sampler).name for s in vs]
            ablation[v] = {"options": ABLATION_GRID[v], "run": names[0], "runs": names, "seeds": vs}
        if len(abl_seeds) > 1:  # paired by seed against the default OTFace and against ArcFace
            for v, a in ablation.items():
                a["summary"] = {m: M.mean_std([runs[n][m] for n in a["runs"]]) for m in metric_names
                                if all(m in runs[n] for n in a["runs"])}
                a["paired_vs_default"] = paired_by_seed(a["runs"], [main_run("otface", s) for s in a["seeds"]])
                if "arcface" in cfg.losses:
                    a["paired_vs_arcface"] = paired_by_seed(a["runs"], [main_run("arcface", s) for s in a["seeds"]])
    meta = {
        "dataset": str(Path(cfg.dataset).resolve()), "toy": cfg.toy,
        "route": ROUTE_LINES[cfg.route].format(network=cfg.network, sampler=cfg.sampler,
                                               upstream=os.environ.get("ARCFACE_TORCH_DIR", "")),
        "split": {"train_identities": prep.train_ids, "test_identities": prep.test_ids,
                  "pairs": prep.pairs, "folds": prep.folds, "split_seed": cfg.split_seed,
                  "pairs_requested": cfg.pairs if cfg.protocol == "split" else prep.pairs,
                  "notes": prep.notes, "description": prep.description, "protocol": cfg.protocol},
        "dataset_info": prep.dataset_info,
        "train": asdict(cfg.train), "sampler": cfg.sampler, "compare_sampler": list(cfg.compare_sampler),
        "otface_defaults": OTFACE_DEFAULTS, "seeds": seeds, "ablation_seeds": len(ablation_seed_list(cfg)),
        "losses": list(cfg.losses), "hard_fraction": HARD_FRACTION, "fars": list(FARS),
        "network": cfg.network if cfg.route == "recipe" else None,
        "torch": torch.__version__, "jobs": cfg.jobs if cfg.route == "plugin" else 1, "cpus": os.cpu_count(),
        "python": platform.python_version(), "machine": platform.machine(),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "runs_dir": str(cfg.runs_dir),
    }
    return {"meta": meta, "summary": summary, "paired": paired, "ablation": ablation,
            "sampler_comparison": sampler_comparison, "ot_activity": ot_activity, "runs": runs}


def ot_term_activity(history: Dict[str, List[float]]) -> Dict[str, Any]:
    """When the OT term had hard triplets to act on (from the logged steps).

    On a small training set the batches become separable within the triplet margin, the
    hard triplets disappear and OTFace reduces to its margin loss: the report must say when.
    """
    steps, trip = history["step"], history["triplets"]
    active = [s for s, t in zip(steps, trip) if t > 0]
    last = active[-1] if active else None
    thirds = [float(np.mean([t > 0 for t in part])) if len(part) else 0.0
              for part in np.array_split(np.asarray(trip, dtype=float), 3)]

    def by_third(key: str) -> List[float]:
        return [float(np.mean(part)) if len(part) else 0.0
                for part in np.array_split(np.asarray(history.get(key, []), dtype=float), 3)]

    def nan_by_third(key: str) -> List[Optional[float]]:  # None: no finite value in that third
        parts = np.array_split(np.asarray(history.get(key, []), dtype=float), 3)
        return [float(np.nanmean(p)) if len(p) and np.isfinite(p).any() else None for p in parts]

    return {"logged_steps": len(steps), "active_share": len(active) / max(1, len(steps)),
            "active_share_by_third": thirds, "mean_ot_by_third": by_third("ot"),
            "mean_triplets_by_third": by_third("triplets"),
            "mean_lambda_by_third": nan_by_third("lambda"),
            "mean_grad_share_by_third": nan_by_third("grad_share"),
            "mean_grad_cos_by_third": nan_by_third("grad_cos"),
            "last_active_step": last, "first_triplets": trip[0] if trip else 0.0,
            "mean_triplets": float(np.mean(trip)) if trip else 0.0}
