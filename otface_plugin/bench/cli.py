"""``otface-bench`` / ``python -m otface_plugin.bench``: the whole study in one command.

    otface-bench                       # full study: 3 losses x 5 seeds + OTFace ablation (~26 min on 2 idle
                                       # cores through the plugin route; ~9 h through the recipe route)
    otface-bench --toy --out /tmp/toy  # pipeline check in under a minute
    otface-bench ../shared/data/lfw    # LFW protocol study (pairs.txt found): train on people.txt
                                       # sets 1-5, test on pairs.txt folds 6-10, 3 losses x 3 seeds,
                                       # 79 min on the 2-core dev machine -> results/lfw/
    otface-bench ../shared/data/lfw --compare-sampler otface   # + OTFace with the hard sampler
                                       # (3 more runs, paired by seed): the committed results/lfw/
    otface-bench ../shared/data/lfw --toy   # the same in about a minute (results/lfw_toy/, labelled toy)
    otface-bench --no-ablation --seeds 3
    otface-bench --route plugin        # the committed report's route, whatever ARCFACE_TORCH_DIR says
    ARCFACE_TORCH_DIR=... OTFACE_TRAIN_PYTHON=... otface-bench --route recipe --toy --out /tmp/toy_recipe

Routes: "plugin" trains in the plugin's own minimal loop (otface_plugin.bench.train); "recipe"
patches a copy of $ARCFACE_TORCH_DIR under the work dir (never the checkout itself) and trains each
run with `torchrun train_v2.py` (upstream backbone, --network) in $OTFACE_TRAIN_PYTHON (default:
this Python); "auto" (default) is recipe when ARCFACE_TORCH_DIR is set, else plugin. The recipe
route costs far more per step (see docs/evidence.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from otface_plugin.bench.data import SAMPLERS, BenchError, default_dataset_dir
from otface_plugin.bench.recipe import ROUTES
from otface_plugin.bench.study import ABLATION_GRID, StudyConfig, lfw_config, run_study, toy_config
from otface_plugin.bench.spec import LOSS_CHOICES, LOSSES
from otface_plugin.cli_output import outcome, run_cli
from otface_plugin.data.errors import DatasetLayoutError
from otface_plugin.interrupts import sigterm_as_interrupt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otface-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("dataset", nargs="?", help="identity-folder dataset (default: $OTFACE_SHARED_DATA "
                   "or <repo>/../shared/data/extyaleb)")
    p.add_argument("--out", help="report, plots and results.json (default: results; with the LFW "
                   "protocol results/lfw, or results/lfw_toy with --toy)")
    p.add_argument("--work", default="", help="built data and finished runs (default: OUT/_work)")
    p.add_argument("--toy", action="store_true", help="tiny pipeline check (12 identities, 1 seed, 30 steps)")
    p.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default 5; toy 1)")
    p.add_argument("--steps", type=int, help="training steps per run (default 600; toy 30)")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, of "
                   + ", ".join(LOSS_CHOICES) + " (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-ablation", action="store_true", help="skip the OTFace ablation")
    g.add_argument("--ablation", help="comma-separated ablation variants, NAME or NAME@N (at the first N "
                   "seeds; default: --ablation-seeds) (default: all of "
                   + ", ".join(ABLATION_GRID) + ")")
    p.add_argument("--ablation-seeds", type=int, default=1, metavar="N", help="run the ablation variants at "
                   "the first N seeds, paired by seed with the default OTFace and ArcFace (default %(default)s)")
    p.add_argument("--test-identities", type=int, help="held-out identities (default 20: 10 folds of 2)")
    p.add_argument("--pairs", type=int, help="held-out pairs in the .bin (default 6000, or what the "
                   "held-out identities can give)")
    p.add_argument("--protocol", choices=("auto", "split", "lfw"), default="auto",
                   help="split: random identity-disjoint split of the identity folders; lfw: LFW's own "
                   "people.txt/pairs.txt (train on some sets, test on the other sets' folds); auto "
                   "(default): lfw when the dataset folder has pairs.txt, people.txt and images/")
    p.add_argument("--lfw-train-sets", default="1-5", help="lfw: people.txt sets to train on, 1-based "
                   "(default %(default)s); the test pairs are the folds of the other sets")
    p.add_argument("--jobs", type=int, default=0, help="runs trained in parallel, one single-threaded "
                   "process each (default: min(2, CPUs)); 1 trains in this process")
    p.add_argument("--threads", type=int, default=0, help="torch threads with --jobs 1 (default: torch's choice)")
    p.add_argument("--route", choices=ROUTES, default="auto",
                   help="plugin: own minimal loop; recipe: patched train_v2.py from $ARCFACE_TORCH_DIR; "
                   "auto (default): recipe when ARCFACE_TORCH_DIR is set, else plugin")
    p.add_argument("--sampler", choices=SAMPLERS, default="pk",
                   help="batches: P x K (pk) or with groups of neighbouring identities (hard)")
    p.add_argument("--compare-sampler", default="", metavar="LOSSES",
                   help="comma-separated losses also trained with the other sampler (hard when --sampler "
                   "is pk) on the same seeds; the report adds the paired other - main differences")
    p.add_argument("--network", default="mbf", help="upstream backbone of the recipe route (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    dataset = args.dataset or str(default_dataset_dir())
    from otface_plugin.bench.lfw import is_lfw

    protocol = args.protocol if args.protocol != "auto" else ("lfw" if is_lfw(Path(dataset)) else "split")
    if not args.out:  # the LFW study must not overwrite the committed identity-split report
        args.out = "results" if protocol == "split" else ("results/lfw_toy" if args.toy else "results/lfw")
    if protocol == "lfw":
        if args.test_identities or args.pairs:
            raise SystemExit("otface-bench: --test-identities/--pairs do not apply to --protocol lfw "
                             "(the test pairs are pairs.txt's; choose them with --lfw-train-sets)")
        cfg = replace(lfw_config(dataset, args.out, args.toy), lfw_train_sets=args.lfw_train_sets)
    else:
        cfg = toy_config(dataset, args.out) if args.toy else StudyConfig(dataset=dataset, out=args.out)
    train = cfg.train
    if args.steps:
        train = replace(train, steps=args.steps)
    if args.threads:
        train = replace(train, threads=args.threads)
    cfg = replace(cfg, train=train, work=args.work, sampler=args.sampler)
    cfg = replace(cfg, jobs=args.jobs or min(2, os.cpu_count() or 1))
    from otface_plugin.bench.recipe import resolve_route

    cfg = replace(cfg, route=resolve_route(args.route), network=args.network)
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    unknown = sorted(set(losses) - set(LOSS_CHOICES))
    if unknown:
        raise SystemExit(f"otface-bench: unknown loss {unknown}; choose from {LOSS_CHOICES}")
    cfg = replace(cfg, losses=losses)
    compare = tuple(x.strip() for x in args.compare_sampler.split(",") if x.strip())
    if set(compare) - set(losses):
        raise SystemExit(f"otface-bench: --compare-sampler {sorted(set(compare) - set(losses))} not in "
                         f"--losses {losses}: the comparison is paired with the main runs of the same loss")
    cfg = replace(cfg, compare_sampler=compare)
    if args.no_ablation:
        cfg = replace(cfg, ablation=False)
    elif args.ablation:
        variants, counts = parse_variants(args.ablation, len(cfg.seeds))
        cfg = replace(cfg, ablation=True, ablation_variants=variants, ablation_seed_counts=counts)
    if args.ablation_seeds < 1 or args.ablation_seeds > len(cfg.seeds):
        raise SystemExit(f"otface-bench: --ablation-seeds must be in 1..{len(cfg.seeds)} (the study's seeds), "
                         f"got {args.ablation_seeds}")
    cfg = replace(cfg, ablation_seeds=args.ablation_seeds)
    if args.test_identities:
        cfg = replace(cfg, test_identities=args.test_identities)
    if args.pairs:
        cfg = replace(cfg, pairs=args.pairs)
    return cfg


def parse_variants(text: str, seeds: int):
    """``--ablation`` entries: ``NAME`` or ``NAME@N`` (that variant at the first N seeds)."""
    variants, counts = [], []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, n = item.partition("@")
        if name not in ABLATION_GRID:
            raise SystemExit(f"otface-bench: unknown ablation variant {name!r}; choose from {list(ABLATION_GRID)}")
        if n:
            if not n.isdigit() or not 1 <= int(n) <= seeds:
                raise SystemExit(f"otface-bench: ablation variant {item!r}: the seed count after @ must be in "
                                 f"1..{seeds}")
            counts.append((name, int(n)))
        variants.append(name)
    return tuple(variants), tuple(counts)


def write_outputs(results, scores, issame, out: Path, command: str) -> None:
    """results.json, the PNG plots, REPORT.md and README_table.md into ``out``."""
    from otface_plugin.bench import plots, report

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plots.plot_training(results, out / "training.png")
    plots.plot_roc(results, scores, issame, out / "roc.png")
    plots.plot_similarity_hist(results, scores, issame, out / "similarity_hist.png")
    plots.plot_ablation(results, out / "ablation.png")
    (out / "REPORT.md").write_text(report.render(results, command))
    (out / "README_table.md").write_text(report.readme_table(results))
    # The built data and per-run checkpoints are caches, not results to commit.
    (out / ".gitignore").write_text("_work/\n")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("otface-bench", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if not Path(cfg.dataset).is_dir():
        print(f"otface-bench: dataset {cfg.dataset} not found (pass it as an argument or set "
              "OTFACE_SHARED_DATA)", file=sys.stderr)
        return 2
    if cfg.route == "recipe":
        from otface_plugin.bench import recipe

        if not os.environ.get(recipe.ENV_UPSTREAM):
            print("otface-bench: --route recipe needs ARCFACE_TORCH_DIR (an arcface_torch checkout)",
                  file=sys.stderr)
            return 2
        missing = recipe.missing_deps()
        if missing:
            print(f"otface-bench: {recipe.train_python()} cannot run train_v2.py ({missing}); set "
                  "OTFACE_TRAIN_PYTHON to the training environment's python", file=sys.stderr)
            return 2
    try:
        import matplotlib  # noqa: F401  (fail before an hour of training, not after)
    except ImportError:
        print("otface-bench: the plots need matplotlib: pip install 'otface-plugin[bench]'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt():  # a kill stops the worker processes too, not only this one
            results, scores, issame = run_study(cfg, progress=not args.no_progress)
            write_outputs(results, scores, issame, Path(cfg.out), " ".join(["otface-bench", *argv]))
    except KeyboardInterrupt:
        print("\notface-bench: interrupted; finished runs are kept and the next call resumes", file=sys.stderr)
        return 130
    except (BenchError, DatasetLayoutError, FloatingPointError, OSError, ValueError) as e:
        # Expected failures (data the study cannot use, unwritable output, a diverged run):
        # one line; finished runs are kept, so a fixed call resumes.
        print(f"otface-bench: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    outcome(f"wrote {Path(cfg.out) / 'REPORT.md'}")
    print(f"otface-bench: wrote {Path(cfg.out) / 'REPORT.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
