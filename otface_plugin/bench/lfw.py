"""The LFW protocol study: train on the people of some ``people.txt`` sets, test on the
``pairs.txt`` folds of the other sets.

LFW's View 2 splits its people into 10 disjoint sets and draws fold k's pairs from set k only, so
training on sets S and testing on the folds not in S is identity-disjoint by construction (checked
anyway). The test ``.bin`` holds the chosen folds' pairs in the file's order, so the study's k-fold
evaluation over consecutive pair blocks uses exactly the protocol's folds (threshold from the other
test folds, accuracy on the held-out one: LFW's cross-validation restricted to the test folds).

Expected layout (the shared copy's): ``DATASET/images/<Name>/<Name>_NNNN.jpg``,
``DATASET/people.txt``, ``DATASET/pairs.txt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from otface_plugin.bench.data import BenchError, Prepared, run_data_cli, describe_dataset
from otface_plugin.data.folders import write_identity_list
from otface_plugin.data.lfw_protocol import parse_folds, read_pairs_file, read_people_file

__all__ = ["is_lfw", "prepare_lfw", "format_folds"]


def is_lfw(dataset: Path) -> bool:
    """A folder with LFW's protocol files and an ``images/`` tree."""
    return (dataset / "pairs.txt").is_file() and (dataset / "people.txt").is_file() and (dataset / "images").is_dir()


def format_folds(folds: List[int]) -> str:
    """0-based [0, 1, 2, 4] -> "1-3,5" (the 1-based numbering of the LFW files)."""
    out, run = [], []
    for k in sorted(folds):
        if run and k != run[-1] + 1:
            out.append(f"{run[0] + 1}-{run[-1] + 1}" if len(run) > 1 else str(run[0] + 1))
            run = []
        run.append(k)
    if run:
        out.append(f"{run[0] + 1}-{run[-1] + 1}" if len(run) > 1 else str(run[0] + 1))
    return ",".join(out)


def prepare_lfw(dataset: Path, work: Path, train_sets: str = "1-5", max_test_folds: int = 0,
                min_images: int = 2, max_train_identities: int = 0, seed: int = 0, workers: int = 1,
                progress: bool = True) -> Prepared:
    """``train.rec`` from the people of ``train_sets`` with at least ``min_images`` images (a
    seeded subset of ``max_train_identities`` of them when set) and ``test.bin`` from the
    ``pairs.txt`` folds of the other sets (the first ``max_test_folds`` of them when set)."""
    images = dataset / "images"
    try:
        sets = read_people_file(dataset / "people.txt")
        pairs_file = read_pairs_file(dataset / "pairs.txt")
        train_k = parse_folds(train_sets, len(sets))
    except ValueError as e:
        raise BenchError(str(e).replace("--folds", "--lfw-train-sets")) from None
    if len(sets) != len(pairs_file.folds):
        raise BenchError(f"{dataset / 'people.txt'} has {len(sets)} sets but {dataset / 'pairs.txt'} "
                         f"{len(pairs_file.folds)} folds; the LFW study pairs set k with fold k")
    test_k = [k for k in range(len(pairs_file.folds)) if k not in train_k]
    test_k = test_k[:max_test_folds] if max_test_folds else test_k
    if len(test_k) < 2:
        raise BenchError(f"the LFW study needs at least 2 test folds for its cross-validated accuracy; "
                         f"training sets {format_folds(train_k)} leave {format_folds(test_k) or 'none'}")
    train = sorted(name for k in train_k for name, n in sets[k] if n >= min_images)
    if max_train_identities and len(train) > max_train_identities:
        pick = np.random.default_rng(seed).permutation(len(train))[:max_train_identities]
        train = sorted(train[i] for i in pick)
    test_pairs = pairs_file.select(test_k)
    test_people = sorted({n for p in test_pairs for n in (p.name1, p.name2)})
    leak = sorted(set(train) & set(test_people))
    if leak:  # cannot happen with LFW's own files; a hand-made people/pairs file might
        raise BenchError(f"training people also appear in the test pairs: {', '.join(leak[:5])}"
                         + (f" (+{len(leak) - 5} more)" if len(leak) > 5 else ""))
    if len(train) < 2:
        raise BenchError(f"people.txt sets {format_folds(train_k)} have {len(train)} people with "
                         f">= {min_images} images; the study needs more to train")
    work.mkdir(parents=True, exist_ok=True)
    done = work / "prepared.txt"
    stamp = f"lfw {dataset.resolve()} {train} {test_k}\n"
    tr = work / "train_ids.txt"
    if not (done.is_file() and done.read_text() == stamp):
        done.unlink(missing_ok=True)
        write_identity_list(tr, train)
        flags = ["--workers", str(workers), "--force"] + ([] if progress else ["--no-progress"])
        (work / "rec").mkdir(exist_ok=True)
        run_data_cli(["build-rec", str(images), str(work / "rec") + "/", "--identities-from", str(tr), *flags])
        run_data_cli(["build-bin", str(images), str(work / "test.bin"), "--pairs-file", str(dataset / "pairs.txt"),
              "--folds", format_folds(test_k), *flags])
        done.write_text(stamp)
    description = (f"LFW protocol: train on the people of people.txt sets {format_folds(train_k)} with at least "
                   f"{min_images} images{f' ({max_train_identities} of them, seeded subset)' if max_train_identities else ''}, "
                   f"test on the pairs.txt folds {format_folds(test_k)} (people of the other sets: "
                   "identity-disjoint by construction, checked)")
    info = describe_dataset(dataset, images, names=sorted(set(train) | set(test_people)))
    return Prepared(work / "rec", work / "test.bin", train, test_people, len(test_k), len(test_pairs),
                    [], description, info)
