"""Checkpoint sets of the recipe: read, merge and re-split ``checkpoint_gpu_{rank}.pt``.

``train_v2.py`` (``save_all_states: true``) writes one file per rank at the end of each epoch.
Each holds the whole backbone and its optimizer state, but only that rank's shard of
PartialFC_V2's class centres and of their optimizer state (SGD momentum, AdamW moments): rank r of
W holds ``num_local = C // W + (r < C % W)`` rows from ``class_start = C // W * r + min(r, C % W)``
(:func:`shard_range`). Upstream resumes only on the same number of ranks. Here a set saved by N
ranks is merged into the full matrices (:func:`merge`) and split again for M ranks
(:func:`split`); every other value (backbone, its optimizer state, epoch, global step, the
OTFace state in ``state_dict_softmax_fc``) is carried as it is. Values that differ between ranks
(the backbone's BatchNorm buffers: the recipe's DDP does not broadcast buffers) are kept per
rank; a rank that did not exist in the saved set gets rank 0's.

A set is read all or nothing: a missing, unreadable or foreign shard (another run's, another
save's, another layout) is a :class:`CheckpointError` whose one line names the file.

The patched ``train_v2.py`` adds :data:`META_KEY` to each file it saves: how many shards the set
has and the world size its ``global_step`` and LR schedule count in. Sets saved by upstream
itself have no such entry: their shard count is the number of consecutive files from rank 0.

Resuming on M ranks (:func:`resume_into`) maps the step at the same point of training: the
checkpoint is written at an epoch end, and an epoch has ``num_image // (batch_size * W)`` steps on W
ranks, so ``global_step`` under N ranks becomes ``global_step * spe(M) / spe(N)`` under M: the
same number of epochs, hence the same images seen (up to each epoch's dropped remainder) and the
same fraction of the schedule (``total_step = spe(W) * num_epoch``), and the same LR.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["CHECKPOINT_KEYS", "CheckpointError", "CheckpointSet", "META_KEY", "MERGED_FORMAT", "checkpoint_name",
           "map_step", "merge", "read_merged", "read_set", "resume_into", "shard_range", "split", "write_merged",
           "write_set"]

log = logging.getLogger(__name__)

# what upstream's train_v2.py saves per rank
CHECKPOINT_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer",
                   "state_lr_scheduler")
META_KEY = "otface_ckpt"  # {"ranks": shard count, "step_world_size": the world size global_step counts in}
MERGED_FORMAT = "otface-ckpt-merged/1"
_NAME_RE = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")

Path_ = Tuple[Any, ...]


class CheckpointError(ValueError):
    """A checkpoint set or merged file that cannot be used; the message names the file."""


def checkpoint_name(rank: int) -> str:
    return f"checkpoint_gpu_{rank}.pt"


def shard_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """(class_start, num_local) of ``rank``: PartialFC_V2's layout."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


# ----------------------------------------------------------------------------------------------
# reading
def _load(path: Path) -> Dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(data).__name__}, not a dict)")
    return data


def _check_keys(path: Path, ckpt: Dict[str, Any]) -> None:
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train_v2.py checkpoint (no {', '.join(missing)})")


class CheckpointSet:
    """The shards of one save, in rank order."""

    def __init__(self, directory: Path, shards: List[Dict[str, Any]]) -> None:
        self.directory = directory
        self.shards = shards

    @property
    def ranks(self) -> int:
        return len(self.shards)

    @property
    def step_world_size(self) -> int:
        return int(self.shards[0].get(META_KEY, {}).get("step_world_size", self.ranks))


def read_set(directory, num_classes: Optional[int] = None) -> CheckpointSet:
    """Every shard of the set in ``directory``, checked to be one save of one layout.

    The shard count is rank 0's :data:`META_KEY` entry (files of higher ranks, left by an earlier
    run on more ranks, are not part of it), else the consecutive files from rank 0.
    ``num_classes``: the class count the job expects, checked against the shards' rows."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    first = directory / checkpoint_name(0)
    if not first.is_file():
        found = sorted(p.name for p in directory.iterdir() if _NAME_RE.match(p.name))
        raise CheckpointError(f"{first}: missing" + (f" (found {', '.join(found)})" if found else
                                                    " (no checkpoint_gpu_*.pt here; was save_all_states true?)"))
    shards = [_load(first)]
    _check_keys(first, shards[0])
    meta = shards[0].get(META_KEY)
    if meta is not None:
        count = int(meta["ranks"])
    else:
        count = 1
        while (directory / checkpoint_name(count)).is_file():
            count += 1
    for rank in range(1, count):
        path = directory / checkpoint_name(rank)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing ({first.name} belongs to a set of {count} ranks)")
        ckpt = _load(path)
        _check_keys(path, ckpt)
        shards.append(ckpt)
    _check_consistent(directory, shards, num_classes)
    return CheckpointSet(directory, shards)


def _check_consistent(directory: Path, shards: List[Dict[str, Any]], num_classes: Optional[int]) -> None:
    ref = shards[0]
    for rank, ckpt in enumerate(shards[1:], 1):
        path = directory / checkpoint_name(rank)
        for key in ("epoch", "global_step", META_KEY):
            if ckpt.get(key) != ref.get(key):
                raise CheckpointError(f"{path}: a shard of another save ({key} {ckpt.get(key)!r}, but "
                                      f"{checkpoint_name(0)} has {ref.get(key)!r})")
        _check_same_structure(path, ckpt, ref)
    key = centre_key(shards, directory)
    rows = [int(c["state_dict_softmax_fc"][key].shape[0]) for c in shards]
    total = sum(rows)
    if num_classes is not None and total != num_classes:
        raise CheckpointError(f"{directory / checkpoint_name(0)}: the set holds {total} class centres over "
                              f"{len(shards)} ranks, but the job has num_classes {num_classes}")
    for rank, n in enumerate(rows):
        if n != shard_range(total, len(shards), rank)[1]:
            raise CheckpointError(f"{directory / checkpoint_name(rank)}: {n} class centres, but rank {rank} of "
                                  f"{len(shards)} holds {shard_range(total, len(shards), rank)[1]} of {total} "
                                  f"(centres per rank: {', '.join(map(str, rows))}): a shard of another layout")
    for rank, ckpt in enumerate(shards):
        weight = ckpt["state_dict_softmax_fc"][key]
        opt = ckpt["state_optimizer"]
        for pid in opt["param_groups"][-1]["params"]:
            for name, value in opt["state"].get(pid, {}).items():
                if torch.is_tensor(value) and value.dim() == 2 and value.shape[1:] == weight.shape[1:] \
                        and value.shape != weight.shape:
                    raise CheckpointError(f"{directory / checkpoint_name(rank)}: optimizer {name} of "
                                          f"{value.shape[0]} class centres beside {weight.shape[0]} centres")


def _check_same_structure(path: Path, ckpt: Dict[str, Any], ref: Dict[str, Any]) -> None:
    for part in ("state_dict_backbone", "state_dict_softmax_fc"):
        a, b = ckpt[part], ref[part]
        if list(a) != list(b):
            odd = sorted(set(a) ^ set(b))[:3]
            raise CheckpointError(f"{path}: {part} has other keys than {checkpoint_name(0)} ({', '.join(odd)})")
        if part == "state_dict_backbone":
            for name, t in a.items():
                if getattr(t, "shape", None) != getattr(b[name], "shape", None):
                    raise CheckpointError(f"{path}: {part}.{name} has shape {tuple(t.shape)}, "
                                          f"{checkpoint_name(0)} {tuple(b[name].shape)}: another backbone")
    groups = [[len(g["params"]) for g in c["state_optimizer"]["param_groups"]] for c in (ckpt, ref)]
    if groups[0] != groups[1]:
        raise CheckpointError(f"{path}: its optimizer's parameter groups {groups[0]} differ from "
                              f"{checkpoint_name(0)}'s {groups[1]}")


def centre_key(shards: Sequence[Dict[str, Any]], where: Any = "checkpoint") -> str:
    """The key of PartialFC_V2's class centres in ``state_dict_softmax_fc``: its 2-D ``weight``
    (``weight`` for upstream's head, a prefixed one inside the OTFace head)."""
    sd = shards[0]["state_dict_softmax_fc"]
    keys = [k for k, v in sd.items() if (k == "weight" or k.endswith(".weight")) and torch.is_tensor(v) and v.dim() == 2]
    if len(keys) > 1:  # a margin head with weights of its own: the class centres are the sharded one
        keys = [k for k in keys if k.split(".")[-2:-1] != ["margin_softmax"]] or keys
    if len(keys) != 1:
        raise CheckpointError(f"{where}: cannot tell PartialFC_V2's class centres in state_dict_softmax_fc "
                              f"(2-D weights: {keys or 'none'})")
    return keys[0]


# ----------------------------------------------------------------------------------------------
# merging and splitting
def _sharded_paths(ckpt: Dict[str, Any], key: str) -> List[Path_]:
    """Paths of the leaves sharded by class: the centres and, for each parameter of the
    optimizer's last group (PartialFC_V2's), its state tensors of the centres' shape."""
    shape = ckpt["state_dict_softmax_fc"][key].shape
    paths: List[Path_] = [("state_dict_softmax_fc", key)]
    opt = ckpt["state_optimizer"]
    for pid in opt["param_groups"][-1]["params"]:
        for name, value in opt["state"].get(pid, {}).items():
            if torch.is_tensor(value) and value.shape == shape:
                paths.append(("state_optimizer", "state", pid, name))
    return paths


def _get(tree: Any, path: Path_) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _leaves(tree: Any, prefix: Path_ = ()) -> Dict[Path_, Any]:
    if isinstance(tree, dict):
        out: Dict[Path_, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, prefix + (k,)))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) or torch.is_tensor(v) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_leaves(v, prefix + (i,)))
        return out
    return {prefix: tree}


def _equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a, b)))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain ==
        return False


def _replace(tree: Any, values: Dict[Path_, Any], prefix: Path_ = ()) -> Any:
    """A copy of ``tree`` with the leaves at ``values``' paths replaced (containers copied,
    other leaves shared)."""
    if prefix in values:
        return values[prefix]
    if not any(p[:len(prefix)] == prefix for p in values):
        return tree
    if isinstance(tree, dict):
        return {k: _replace(v, values, prefix + (k,)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_replace(v, values, prefix + (i,)) for i, v in enumerate(tree))
    return tree


def merge(ckpts: CheckpointSet) -> Dict[str, Any]:
    """One dict with the full class centres and their optimizer state (rank 0's checkpoint with
    the sharded leaves concatenated in rank order), plus what other ranks hold differently."""
    shards = ckpts.shards
    key = centre_key(shards, ckpts.directory)
    paths = _sharded_paths(shards[0], key)
    for rank, ckpt in enumerate(shards[1:], 1):
        if _sharded_paths(ckpt, key) != paths:
            raise CheckpointError(f"{ckpts.directory / checkpoint_name(rank)}: its optimizer state of the class "
                                  f"centres differs in kind from {checkpoint_name(0)}'s")
    full = {p: torch.cat([_get(c, p) for c in shards]) for p in paths}
    ref = _leaves(shards[0])
    differences = []
    for rank, ckpt in enumerate(shards[1:], 1):
        mine = _leaves(ckpt)
        if mine.keys() != ref.keys():
            odd = sorted(set(mine) ^ set(ref), key=repr)[:2]
            raise CheckpointError(f"{ckpts.directory / checkpoint_name(rank)}: holds other entries than "
                                  f"{checkpoint_name(0)} ({odd})")
        differences.append({p: v for p, v in mine.items() if p not in full and not _equal(v, ref[p])})
    body = _replace(shards[0], full)
    meta = body.pop(META_KEY, None) or {}
    return {"format": MERGED_FORMAT, "ranks": ckpts.ranks, "step_world_size": ckpts.step_world_size, "meta": meta,
            "num_classes": sum(int(c["state_dict_softmax_fc"][key].shape[0]) for c in shards),
            "centre_key": key, "sharded": paths, "checkpoint": body, "rank_differences": differences}


def split(merged: Dict[str, Any], world_size: int) -> List[Dict[str, Any]]:
    """The checkpoint of each of ``world_size`` ranks (:func:`split_rank` for every rank)."""
    _check_world_size(merged, world_size)
    return [split_rank(merged, world_size, rank) for rank in range(world_size)]


def split_rank(merged: Dict[str, Any], world_size: int, rank: int) -> Dict[str, Any]:
    """Rank ``rank``'s checkpoint of ``world_size`` ranks: the class-sharded leaves cut by
    PartialFC_V2's layout for that many ranks; a saved rank's own differing values where it
    existed, rank 0's otherwise."""
    _check_world_size(merged, world_size)
    body = merged["checkpoint"]
    start, n = shard_range(merged["num_classes"], world_size, rank)
    values = {p: _get(body, p)[start:start + n].clone() for p in merged["sharded"]}
    if 1 <= rank <= len(merged["rank_differences"]):
        values.update(merged["rank_differences"][rank - 1])
    ckpt = _replace(body, values)
    ckpt[META_KEY] = {**merged["meta"], "ranks": world_size, "step_world_size": merged["step_world_size"]}
    return ckpt


def _check_world_size(merged: Dict[str, Any], world_size: int) -> None:
    if world_size < 1:
        raise CheckpointError(f"world size must be >= 1, got {world_size}")
    if world_size > merged["num_classes"]:
        raise CheckpointError(f"world size {world_size} is more than the {merged['num_classes']} classes: a rank "
                              "would hold no class centre")


# ----------------------------------------------------------------------------------------------
# files
def read_merged(path) -> Dict[str, Any]:
    path = Path(path)
    data = _load(path)
    if data.get("format") != MERGED_FORMAT:
        raise CheckpointError(f"{path}: not a merged checkpoint (made by `otface-ckpt merge`)")
    return data


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise CheckpointError(f"{existing[0]}: exists (use --force to overwrite)")


def write_merged(merged: Dict[str, Any], path, force: bool = False) -> Path:
    from otface_plugin.atomicfile import atomic_file

    path = Path(path)
    _refuse_existing([path], force)
    with atomic_file(path) as f:
        torch.save(merged, f)
    return path


def write_set(shards: Sequence[Dict[str, Any]], directory, force: bool = False) -> List[Path]:
    """Each rank's file, each written atomically; nothing is written when one exists without ``force``."""
    from otface_plugin.atomicfile import atomic_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / checkpoint_name(r) for r in range(len(shards))]
    _refuse_existing(paths, force)
    for path, ckpt in zip(paths, shards):
        with atomic_file(path) as f:
            torch.save(ckpt, f)
    return paths


# ----------------------------------------------------------------------------------------------
# resuming in train_v2.py
def steps_per_epoch(cfg: Any, world_size: int) -> int:
    """The recipe's steps per epoch on ``world_size`` ranks (train_v2.py's total_step / num_epoch)."""
    return cfg.num_image // (cfg.batch_size * world_size)


def map_step(global_step: int, saved_world_size: int, world_size: int, cfg: Any) -> int:
    """``global_step`` counted on ``saved_world_size`` ranks, as a step on ``world_size`` ranks
    at the same point of training (the same epochs done): exact at an epoch end, where the recipe
    saves; rounded down elsewhere."""
    old, new = steps_per_epoch(cfg, saved_world_size), steps_per_epoch(cfg, world_size)
    if old <= 0 or new <= 0:
        raise CheckpointError(f"num_image {cfg.num_image} is less than one batch of {cfg.batch_size} per rank "
                              f"on {max(saved_world_size, world_size)} ranks")
    return global_step * new // old


def saved_layout(directory) -> Optional[Tuple[int, int]]:
    """(shard count, step world size) of the set in ``directory`` from rank 0's file alone, or
    None when there is no rank 0 file (train_v2.py's own load then says so)."""
    directory = Path(directory)
    first = directory / checkpoint_name(0)
    if not first.is_file():
        return None
    try:
        meta = torch.load(first, map_location="cpu", weights_only=False, mmap=True).get(META_KEY)
    except Exception:  # noqa: BLE001 - read_set reports a bad file properly
        meta = None
    if meta is not None:
        return int(meta["ranks"]), int(meta["step_world_size"])
    count = 1
    while (directory / checkpoint_name(count)).is_file():
        count += 1
    return count, count


def resume_into(cfg: Any, rank: int, world_size: int, backbone: torch.nn.Module, head: torch.nn.Module,
                opt: torch.optim.Optimizer, lr_scheduler: Any) -> Tuple[int, int]:
    """Load the set in ``cfg.output`` (saved on any number of ranks) into this rank's modules,
    optimizer and LR scheduler; returns (start_epoch, global_step) on ``world_size`` ranks.

    The scheduler is rebuilt by the job (its total_step counts on ``world_size`` ranks) and set to
    the mapped step (:func:`map_step`): ``last_epoch`` the step, ``_step_count`` one more (its
    construction counts as a step), the LR the schedule's closed form there."""
    ckpts = read_set(cfg.output, num_classes=cfg.num_classes)
    merged = merge(ckpts)
    mine = split_rank(merged, world_size, rank)  # this rank only: no copy of the others' shards
    backbone.load_state_dict(mine["state_dict_backbone"])
    head.load_state_dict(mine["state_dict_softmax_fc"])
    opt.load_state_dict(mine["state_optimizer"])
    step = map_step(mine["global_step"], merged["step_world_size"], world_size, cfg)
    set_scheduler_step(lr_scheduler, step)
    if rank == 0:
        log.info("otface-plugin: resumed %s (%d ranks, step %d counted on %d ranks) on %d ranks at epoch %d, "
                 "step %d, lr %s", os.fspath(cfg.output), ckpts.ranks, mine["global_step"], merged["step_world_size"],
                 world_size, mine["epoch"], step, lr_scheduler.get_last_lr())
    return int(mine["epoch"]), step


def set_scheduler_step(lr_scheduler: Any, step: int) -> None:
    lr_scheduler.last_epoch = step
    lr_scheduler._step_count = step + 1
    if step > 0:
        lrs = lr_scheduler._get_closed_form_lr()
        for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
    lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]


# ----------------------------------------------------------------------------------------------
# fine-tuning: a job that starts from a backbone state dict and, optionally, merged class centres
def _keys_line(kind: str, keys: Sequence[str]) -> str:
    shown = ", ".join(list(keys)[:4])
    return f"{kind} {shown}" + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def backbone_state(path) -> Dict[str, Any]:
    """The backbone state dict in ``path``: the recipe's ``model.pt``, a rank's checkpoint or a
    merged one (their ``state_dict_backbone``)."""
    path = Path(path)
    data = _load(path)
    if data.get("format") == MERGED_FORMAT:
        data = data["checkpoint"]
    if "state_dict_backbone" in data:
        data = data["state_dict_backbone"]
    if not data or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise CheckpointError(f"{path}: not a backbone state dict (model.pt) or checkpoint")
    if all(k.startswith("module.") for k in data):  # saved from the DDP wrapper
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def load_backbone(path, backbone: torch.nn.Module, network: str = "backbone") -> None:
    """Strict load of ``path`` into ``backbone``: missing or unexpected keys, or another shape,
    are one error naming the file and the keys; nothing is loaded then."""
    state = backbone_state(path)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [_keys_line(kind, keys) for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                 if keys]
        raise CheckpointError(f"{path}: not a state dict of the {network} backbone: {'; '.join(parts)}")
    shapes = [k for k in own if own[k].shape != state[k].shape]
    if shapes:
        k = shapes[0]
        raise CheckpointError(f"{path}: not a state dict of this {network} backbone: {k} has shape "
                              f"{tuple(state[k].shape)}, the backbone {tuple(own[k].shape)}"
                              + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    backbone.load_state_dict(state, strict=True)


def class_centres(path) -> torch.Tensor:
    """The (num_classes, D) class centres in ``path``: a merged checkpoint (``otface-ckpt merge``)
    or a saved 2-D tensor."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and data.get("format") == MERGED_FORMAT:
        data = data["checkpoint"]["state_dict_softmax_fc"][data["centre_key"]]
    if not (torch.is_tensor(data) and data.dim() == 2):
        raise CheckpointError(f"{path}: neither a merged checkpoint (otface-ckpt merge) nor a 2-D tensor of "
                              "class centres")
    return data


def load_class_centres(path, weight: torch.nn.Parameter, num_classes: int, rank: int, world_size: int) -> None:
    """This rank's rows of the full class centres in ``path`` into PartialFC_V2's ``weight``."""
    full = class_centres(path)
    if full.shape != (num_classes, weight.shape[1]):
        raise CheckpointError(f"{path}: class centres of shape {tuple(full.shape)}, but the job has num_classes "
                              f"{num_classes} and embedding_size {weight.shape[1]}")
    start, n = shard_range(num_classes, world_size, rank)
    with torch.no_grad():
        weight.copy_(full[start:start + n])


# ----------------------------------------------------------------------------------------------
# otface-ckpt
def describe(ckpts: CheckpointSet) -> Dict[str, Any]:
    """What ``otface-ckpt show`` prints, as a dict."""
    first = ckpts.shards[0]
    key = centre_key(ckpts.shards, ckpts.directory)
    meta = first.get(META_KEY, {})
    return {"directory": os.fspath(ckpts.directory), "ranks": ckpts.ranks,
            "step_world_size": ckpts.step_world_size,
            "classes": sum(int(c["state_dict_softmax_fc"][key].shape[0]) for c in ckpts.shards),
            "embedding_size": int(first["state_dict_softmax_fc"][key].shape[1]),
            "epoch": int(first["epoch"]), "global_step": int(first["global_step"]),
            "precision": meta.get("precision", "not recorded (saved by upstream train_v2.py)"),
            "grad_scaler": "state_grad_scaler" in first,
            "optimizer": sorted({n for s in first["state_optimizer"]["state"].values() for n in s}),
            "class_centres": f"state_dict_softmax_fc.{key}"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from otface_plugin.cli_output import run_cli

    return run_cli("otface-ckpt", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="otface-ckpt", description="Show, merge and re-split the recipe's "
                                "checkpoint sets (checkpoint_gpu_{rank}.pt, save_all_states: true).")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="ranks, classes, step, epoch, precision, embedding size of a set")
    show.add_argument("directory")
    show.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    checked = ("the job's num_classes, checked against the set: a set saved by upstream itself does not record "
               "its rank count, so only this tells a missing last shard")
    show.add_argument("--num-classes", type=int, help=checked)
    mer = sub.add_parser("merge", help="one file with the full class centres and their optimizer state")
    mer.add_argument("directory")
    mer.add_argument("out")
    mer.add_argument("--force", action="store_true", help="overwrite OUT")
    mer.add_argument("--num-classes", type=int, help=checked)
    spl = sub.add_parser("split", help="the inverse of merge: a set of --world-size ranks in DIRECTORY")
    spl.add_argument("merged")
    spl.add_argument("directory")
    spl.add_argument("--world-size", type=int, required=True)
    spl.add_argument("--force", action="store_true", help="overwrite existing checkpoint_gpu_*.pt")
    args = p.parse_args(argv)
    try:
        if args.command == "show":
            info = describe(read_set(args.directory, num_classes=args.num_classes))
            if args.json:
                print(json.dumps(info))
            else:
                for k, v in info.items():
                    print(f"{k:16} {v}")
        elif args.command == "merge":
            ckpts = read_set(args.directory, num_classes=args.num_classes)
            out = write_merged(merge(ckpts), args.out, force=args.force)
            print(f"{out}: {ckpts.ranks} shards merged")
        else:
            paths = write_set(split(read_merged(args.merged), args.world_size), args.directory, force=args.force)
            print(f"{args.directory}: {len(paths)} checkpoint files written")
    except (CheckpointError, OSError) as exc:
        print(f"otface-ckpt: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
