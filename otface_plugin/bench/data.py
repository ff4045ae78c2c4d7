"""Data for the study: identity-disjoint split, ``.rec``/``.bin`` built with ``otface-data``,
and in-memory tensors read back through the plugin's RecordIO reader and P x K sampler.

The dataset is tiny (a few thousand 112 x 112 images), so every image is decoded once into a
uint8 tensor; batches are then index operations and the training loop measures the loss, not
JPEG decoding.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from otface_plugin.data import IdentityIndex, MXIndexedRecordIO
from otface_plugin.data.sampler import SAMPLER_CLASSES
from otface_plugin.data.dataset import read_image_record
from otface_plugin.data.folders import read_identity_list, write_identity_list
from otface_plugin.data.imagecodec import decode_image

ENV_SHARED = "OTFACE_SHARED_DATA"


def default_dataset_dir() -> Path:
    """``$OTFACE_SHARED_DATA`` (the shared data root or the dataset itself), else
    ``<repo>/../shared/data/extyaleb``."""
    env = os.environ.get(ENV_SHARED)
    repo = Path(__file__).resolve().parents[2]
    candidates = ([Path(env) / "data" / "extyaleb", Path(env) / "extyaleb", Path(env)] if env
                  else [repo.parent / "shared" / "data" / "extyaleb"])
    for c in candidates:
        if c.is_dir() and any(p.is_dir() for p in c.iterdir()):
            return c
    return candidates[0]


class BenchError(Exception):
    """An expected failure of the study (bad data, impossible settings): one line for the user."""


@dataclass
class Prepared:
    """Paths and facts of a prepared split."""

    rec_dir: Path
    bin_path: Path
    train_ids: List[str]
    test_ids: List[str]
    folds: int
    pairs: int
    notes: List[str] = field(default_factory=list)  # what was chosen for the user, and why
    description: str = ""  # the split in words (set by protocols other than the random split)
    dataset_info: Dict[str, Any] = field(default_factory=dict)  # describe_dataset()


class _LastLine(io.TextIOBase):
    """stderr that is still shown, remembering its last line (the data tool's error message)."""

    def __init__(self, target) -> None:
        self.target, self.last = target, ""

    def write(self, text: str) -> int:
        lines = [x for x in text.splitlines() if x.strip()]
        if lines:
            self.last = lines[-1]
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()


def run_data_cli(args: List[str]) -> None:
    # The documented CLI is the stable interface of the data tools; call it in-process. Its own
    # one-line error becomes the study's (BenchError), not a traceback.
    from otface_plugin.data.cli import main as data_cli

    err = _LastLine(sys.stderr)
    with contextlib.redirect_stderr(err):
        rc = data_cli(args)
    if rc:
        raise BenchError(err.last or f"otface-data {' '.join(args)} failed with exit status {rc}")


def choose_folds_and_pairs(dataset: Path, test_ids: List[str], pairs: int, seed: int
                           ) -> Tuple[int, int, List[str]]:
    """The most identity-disjoint folds (at most 10, 2+ identities each) and pairs (at most
    ``pairs``) that ``otface-data build-bin`` can draw from the held-out identities, and notes
    saying what was lowered and why."""
    from otface_plugin.data.bin_builder import max_balanced_pairs
    from otface_plugin.data.folders import scan_identity_folders

    folders = scan_identity_folders(dataset, test_ids)
    for folds in range(min(10, len(folders) // 2), 1, -1):
        most = max_balanced_pairs(folders, folds, seed)
        if most:
            break
    else:
        raise BenchError(f"the {len(folders)} held-out identities cannot form 2 identity-disjoint folds "
                         "with a same-identity pair each; raise --test-identities")
    notes = []
    want = (pairs // (2 * folds)) * 2 * folds
    if folds < min(10, len(folders) // 2):
        notes.append(f"{folds} folds instead of {min(10, len(folders) // 2)}: with more, a fold would have "
                     "no identity with two images")
    if most < want:
        notes.append(f"{most} pairs instead of {pairs}: the poorest of the {folds} folds has only "
                     f"{most // (2 * folds)} distinct same-identity pairs (raise --test-identities for more)")
    return folds, min(most, want), notes


def prepare(dataset: Path, work: Path, test_identities: int, pairs: int, seed: int = 0,
            image_size: int = 112, workers: int = 1, max_identities: Optional[int] = None,
            progress: bool = True) -> Prepared:
    """Split ``dataset`` (one folder per identity) and build ``train.rec`` + ``test.bin``.

    Outputs land in ``work``; a finished build (marker file) is reused. The ``.bin`` has up to
    ``min(10, test_identities // 2)`` identity-disjoint folds (the builder needs two identities
    per fold for different-identity pairs), so the k-fold evaluation over pair order has folds
    that share no identity, as LFW's; folds and pairs are lowered to what the held-out
    identities can give (:func:`choose_folds_and_pairs`), and ``Prepared.notes`` says so.
    """
    work.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in dataset.iterdir() if p.is_dir() and not p.name.startswith("."))
    if max_identities:
        names = names[:max_identities]
    if not 0 < test_identities < len(names):
        raise BenchError(f"--test-identities {test_identities} must be in (0, {len(names)}): {dataset} "
                         f"has {len(names)} identity folders")
    if test_identities < 4:
        raise BenchError("--test-identities must be at least 4 (2 identity-disjoint folds of 2)")
    done = work / "prepared.txt"
    stamp = f"{dataset.resolve()} {names} {test_identities} {pairs} {seed} {image_size}\n"
    tr, ho = work / "train_ids.txt", work / "test_ids.txt"
    if not (done.is_file() and done.read_text() == stamp):
        done.unlink(missing_ok=True)
        if max_identities:  # a subset: `otface-data split` always scans the whole folder
            from otface_plugin.data.folders import split_identities

            train, hold = split_identities(names, test_identities / len(names), seed)
            write_identity_list(tr, train)
            write_identity_list(ho, hold)
        else:  # the CLI takes a fraction: this one yields exactly test_identities of len(names)
            run_data_cli(["split", str(dataset), "--holdout-fraction", repr(test_identities / len(names)),
                  "--seed", str(seed), "--train-list", str(tr), "--holdout-list", str(ho)])
        folds, pairs, notes = choose_folds_and_pairs(dataset, read_identity_list(ho), pairs, seed)
        flags = ["--resize", str(image_size), "--workers", str(workers), "--force"]
        if not progress:
            flags.append("--no-progress")
        (work / "rec").mkdir(exist_ok=True)
        run_data_cli(["build-rec", str(dataset), str(work / "rec") + "/", "--identities-from", str(tr), *flags])
        run_data_cli(["build-bin", str(dataset), str(work / "test.bin"), "--pairs", str(pairs), "--folds",
              str(folds), "--seed", str(seed), "--identities-from", str(ho), *flags])
        done.write_text(stamp)
    else:
        folds, pairs, notes = choose_folds_and_pairs(dataset, read_identity_list(ho), pairs, seed)
    train_ids, test_ids = read_identity_list(tr), read_identity_list(ho)
    return Prepared(work / "rec", work / "test.bin", train_ids, test_ids, folds, pairs, notes,
                    dataset_info=describe_dataset(dataset, names=sorted(train_ids + test_ids)))


# Short names and one-line descriptions of the datasets this project was measured on, keyed by
# the first heading of the README inside the dataset folder; any other folder is described by
# its name and counts only.
KNOWN_DATASETS = {
    "Extended Yale Face Database B": ("Extended Yale B", "Extended Yale B cropped: frontal faces under "
                                      "64 lighting conditions"),
    "Labeled Faces in the Wild": ("LFW", "Labeled Faces in the Wild (deep-funneled, cropped to 112 x 112): "
                                  "news photos, unconstrained pose, lighting and expression"),
}


def describe_dataset(root: Path, image_root: Optional[Path] = None,
                     names: Optional[List[str]] = None) -> Dict[str, Any]:
    """What the report says about the dataset given: a short name, a line, and counts of the
    identity folders used (``names``, default all under ``image_root`` or ``root``)."""
    from otface_plugin.data.folders import IMAGE_EXTENSIONS

    image_root = image_root or root
    if names is None:
        names = sorted(p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    counts = [sum(1 for f in (image_root / n).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
              for n in names]
    heading = ""
    for readme in ("README.md", "README", "README.txt"):
        if (root / readme).is_file():
            first = next((x for x in (root / readme).read_text(errors="replace").splitlines() if x.strip()), "")
            heading = first.lstrip("#").strip()
            break
    short, line = next(((k, v) for h, (k, v) in KNOWN_DATASETS.items() if heading.startswith(h)),
                       (root.name, heading or "identity folders (no README naming the dataset)"))
    per = np.asarray(counts or [0])
    return {"name": short, "description": line, "path": str(root.resolve()), "identities": len(names),
            "images": int(per.sum()), "images_per_identity": [int(per.min()), float(np.median(per)), int(per.max())]}


@dataclass
class TrainSet:
    """All training images (N, 3, H, W) uint8, labels (N,), and the identity index."""

    images: torch.Tensor
    labels: torch.Tensor
    index: IdentityIndex

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def load_train(rec_dir: Path) -> TrainSet:
    """Decode ``train.rec`` by dataset position (what the sampler yields)."""
    rec = rec_dir / "train.rec"
    index = IdentityIndex.from_rec(rec, rec_dir / "train.idx")
    positions = np.arange(index.num_positions)
    keys = index.record_ids(positions)
    reader = MXIndexedRecordIO(str(rec_dir / "train.idx"), str(rec), "r")
    try:
        imgs = np.stack([read_image_record(reader, int(k))[1] for k in keys])
    finally:
        reader.close()
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(index.labels())
    return TrainSet(images, labels, index)


def load_bin(path: Path) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Unique images (U, 3, H, W) uint8, pair -> image ids (P, 2), issame (P,) bool.

    Identical encoded images are decoded once: the pairs reuse images heavily.
    """
    with open(path, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")
    uid: dict = {}
    ids = np.array([uid.setdefault(bytes(b), len(uid)) for b in bins], dtype=np.int64)
    images = np.stack([decode_image(b) for b in uid])
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), ids.reshape(-1, 2),
            np.asarray(issame, dtype=bool))


_LOADED: Dict[str, Any] = {}


def load_prepared(rec_dir: Path, bin_path: Path) -> Tuple[TrainSet, Tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """The decoded train set and test pairs, once per process (a study's worker processes train
    several runs on the same data)."""
    key = f"{rec_dir}|{bin_path}"
    if _LOADED.get("key") != key:
        _LOADED.update(key=key, train=load_train(Path(rec_dir)), bin=load_bin(Path(bin_path)))
    return _LOADED["train"], _LOADED["bin"]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the recipe's ``(x / 255 - 0.5) / 0.5``."""
    return images.float().div_(127.5).sub_(1.0)


SAMPLERS = tuple(SAMPLER_CLASSES)  # the study's batch plans: "pk" (PKSampler), "hard" (HardPKSampler)
HARD_REFRESH_STEPS = 20  # sampler "hard": class centres re-read every this many steps


def train_batches(train: TrainSet, batch_size: int, K: int, seed: int, steps: int,
                  sampler: str = "pk", centres: Optional[Callable[[], torch.Tensor]] = None
                  ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` P x K batches from the plugin's PKSampler, epoch after epoch, with the recipe's
    random horizontal flip drawn from a generator of its own: the order and the flips depend
    only on ``seed``, so every loss sees the same images in the same order.

    ``sampler="hard"``: HardPKSampler, its neighbours refreshed from ``centres()`` (the margin
    head's class centres) on the sampler's schedule (:meth:`HardPKSampler.refresh_due`, every
    ``HARD_REFRESH_STEPS`` steps and at each epoch end, as the recipe route), in effect from the
    next step (this loop plans no step ahead)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cls = SAMPLER_CLASSES[sampler]
    plan = cls(train.index, batch_size, num_instances=K, num_replicas=1, rank=0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    done, epoch = 0, 0
    while done < steps:
        plan.set_epoch(epoch)
        positions = iter(plan)
        for _ in range(plan.steps_per_epoch):
            if done == steps:
                return
            chunk = np.fromiter(positions, dtype=np.int64, count=batch_size)
            idx = torch.from_numpy(chunk)
            x = normalise(train.images[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            yield x, train.labels[idx]
            done += 1
            # after the caller's step on this batch, before the next one (or the next epoch) is planned
            if sampler == "hard" and done < steps and plan.refresh_due(done, HARD_REFRESH_STEPS):
                plan.refresh(centres(), done)
        epoch += 1
